"""Watch an induction head form in a 2-layer attention-only model, and not in a 1-layer one.

    python examples/induction_heads.py                    # seed 0, 600 steps each (about a minute on 1 CPU thread)
    python examples/induction_heads.py --seeds 0 1 2 --png induction.png

Trains attnzoo's bench TinyLM (causal softmax ``mha``, rotary positions, no MLP) with 1 and 2
layers on repeated random sequences (:func:`attnzoo.inspect.induction_demo.induction_emergence`)
and prints, every 100 steps, the best head's induction score in both conventions (ARENA
stripe, threshold 0.4; TransformerLens "mul", threshold 0.2) and the held-out loss on the first
and the second copy of the sequence. ``--png`` saves the curves if matplotlib is installed.
"""

from __future__ import annotations

import argparse

import torch

from attnzoo.inspect.induction_demo import induction_emergence


def show(result: dict) -> None:
    cfg, thr = result["config"], result["thresholds"]
    print(f"\n{cfg['n_layers']}-layer model, seed {cfg['seed']} ({result['seconds']:.0f} s)")
    print(f"{'step':>5} {'stripe':>7} {'mul':>6} {'head':>6} {'loss 1st':>9} {'loss 2nd':>9}")
    for row in result["curve"]:
        layer, head = row["head"]
        print(f"{row['step']:>5} {row['stripe']:>7.3f} {row['mul']:>6.3f} {f'L{layer}H{head}':>6} "
              f"{row['loss_first']:>9.2f} {row['loss_second']:>9.2f}")
    at, last = result["crossed_at"], result["curve"][-1]["step"] if result["curve"] else 0
    print("; ".join(f"{name} >= {thr[name]} " + (f"first at step {at[name]}" if at[name] is not None
                                                  else f"never in {last} steps")
                    for name in ("stripe", "mul")))


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {path} not written (pip install 'attnzoo[report]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        steps = [row["step"] for row in r["curve"]]
        label = f"{r['config']['n_layers']} layer(s), seed {r['config']['seed']}"
        style = "-" if r["config"]["n_layers"] > 1 else "--"
        axes[0].plot(steps, [row["stripe"] for row in r["curve"]], style, label=label)
        axes[1].plot(steps, [row["loss_second"] for row in r["curve"]], style, label=label)
    axes[0].axhline(results[0]["thresholds"]["stripe"], color="grey", lw=0.8)
    axes[0].set(xlabel="step", ylabel="induction score (stripe, best head)")
    axes[1].set(xlabel="step", ylabel="loss on the second copy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", default=None, help="save the curves to this PNG (needs matplotlib)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        for n_layers in args.layers:
            r = induction_emergence(n_layers, args.steps, seed, threads=args.threads)
            show(r)
            results.append(r)
    print("\nfinal scores")
    print(f"{'layers':>6} {'seed':>4} {'stripe':>7} {'mul':>6} {'loss 1st':>9} {'loss 2nd':>9} {'crossed at':>10}")
    for r in results:
        f, at = r["final"], r["crossed_at"]["stripe"]
        print(f"{r['config']['n_layers']:>6} {r['config']['seed']:>4} {f['stripe']:>7.3f} {f['mul']:>6.3f} "
              f"{f['loss_first']:>9.2f} {f['loss_second']:>9.2f} {'never' if at is None else at:>10}")
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
