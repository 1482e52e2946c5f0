"""Mixture-of-heads' gather dispatch of two code versions side by side in one process (before/after a change).

Prepare the older version as a renamed package next to the checkout, then run from the checkout root::

    mkdir -p /tmp/moh_pair && git archive BASE_COMMIT attnzoo | tar -x -C /tmp/moh_pair
    mv /tmp/moh_pair/attnzoo /tmp/moh_pair/attnzoo_base
    grep -rl attnzoo /tmp/moh_pair/attnzoo_base --include=*.py | xargs sed -i -e 's/\\battnzoo\\./attnzoo_base./g' \\
        -e 's/^import attnzoo$/import attnzoo_base as attnzoo/' -e 's/from attnzoo import/from attnzoo_base import/g'
    PYTHONPATH=$PWD:/tmp/moh_pair python benchmarks/bench_moh_versions.py --rounds 6 --setting 1024,8,2,2

Both modules get the same weights and inputs; their outputs are checked equal first. Rounds alternate which
version runs first; each timing is the median of 3 calls (process CPU time, one torch thread, as
``bench_moh.py``); the table gives the median over rounds and the range. ``dense`` is the current version's
dense dispatch, measured once per row for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnzoo.layers.dense_multihead.moh import MixtureOfHeads

SETTINGS = ["256,8,2,2", "1024,8,2,2", "2048,8,2,2"]


def _step(m: MixtureOfHeads, x: torch.Tensor, causal: bool, backward: bool) -> None:
    if backward:
        m.zero_grad(set_to_none=True)
        m(x.detach().requires_grad_(), causal=causal).sum().backward()
    else:
        with torch.no_grad():
            m(x, causal=causal)


def _clock(m, x: torch.Tensor, causal: bool, backward: bool, repeats: int = 3) -> float:
    _step(m, x, causal, backward)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        _step(m, x, causal, backward)
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    from attnzoo_base.layers.dense_multihead.moh import MixtureOfHeads as Base

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--setting", action="append", default=[], metavar="N,HEADS,SHARED,TOP_K")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| N | heads | shared | top_k | C/N | causal | pass | dense (ms) | gather before (ms) | gather after (ms) "
          "| after / before |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in args.setting or SETTINGS:
        n, heads, shared, top_k = (int(v) for v in setting.split(","))
        dim = heads * 64
        new = MixtureOfHeads(dim, heads, n_shared=shared, top_k=top_k)
        base = Base(dim, heads, n_shared=shared, top_k=top_k)
        base.load_state_dict(new.state_dict())
        x = torch.randn(2, n, dim)
        with torch.no_grad():
            frac = float((new.route(x)[..., shared:] != 0).sum(1).max()) / n
            new.dispatch = base.dispatch = "gather"
            torch.testing.assert_close(new(x, causal=True), base(x, causal=True), rtol=1e-4, atol=1e-5)
        for causal in (False, True):
            for backward in (False, True):
                t: dict[str, list[float]] = {"base": [], "new": [], "dense": []}
                for r in range(args.rounds):
                    for name, m in (("base", base), ("new", new)) if r % 2 == 0 else (("new", new), ("base", base)):
                        m.dispatch = "gather"
                        t[name].append(_clock(m, x, causal, backward))
                    if r == 0:
                        new.dispatch = "dense"
                        t["dense"].append(_clock(new, x, causal, backward))
                med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
                rng = {k: f"{min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}" for k, v in t.items()}
                print(f"| {n} | {heads} | {shared} | {top_k} | {frac:.2f} | {'yes' if causal else 'no'} | "
                      f"{'fwd+bwd' if backward else 'fwd'} | {med['dense']:.1f} | {med['base']:.1f} ({rng['base']}) | "
                      f"{med['new']:.1f} ({rng['new']}) | {med['new'] / med['base']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
