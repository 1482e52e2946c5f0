"""Watch an induction head form: train an attention-only :class:`~attnzoo.bench.models.TinyLM` on
repeated random sequences and record its induction score during training (Olsson et al., 2022).

:func:`induction_emergence` builds the bench language model around causal softmax ``mha`` with
no MLP (``mlp_ratio=0``, the bench default for language models), trains it on
``[BOS] + filler + r + r`` sequences (``r`` random tokens) with the loss on every next token, and
every ``eval_every`` steps captures its attention weights (:func:`attnzoo.inspect.capture`) on
held-out ``[BOS] + r + r`` sequences of period ``seq_len`` and scores every head with both
conventions of :mod:`attnzoo.inspect.metrics.induction`:

* ``stripe`` (:func:`~attnzoo.inspect.metrics.induction_score_stripe`, ARENA): a perfect induction
  head scores ≈ 1; the threshold here is :data:`STRIPE_THRESHOLD` = 0.4 (the cut-off of ARENA's
  induction-head detector exercises is 0.3-0.4);
* ``mul`` (:func:`~attnzoo.inspect.metrics.induction_score_mul`, TransformerLens): a perfect head
  scores only ``seq_len / (2 seq_len + 1)`` ≈ 0.48, so the threshold is scaled the same way:
  :data:`MUL_THRESHOLD` = 0.2 (0.4 of that). The metric module documents only the perfect-head
  values and warns that thresholds do not transfer between the two conventions.

Two choices make the comparison of one and two layers honest (both measured, see the README):

* The period varies during training (``len(r)`` drawn from ``min_period .. seq_len``, random
  ``filler`` keeping the length at ``2 seq_len + 1``). With one fixed period a layer-0 head that
  looks back exactly ``seq_len - 1`` positions solves the task by position alone: it scores
  ≈ 0.9 on the stripe metric without any prefix matching, in a one-layer model as well.
  ``min_period=None`` trains on the fixed period.
* Positions are rotary (``positional="rope"``, in every ``mha``) by default. With learned
  absolute position embeddings (``positional="learned"``, ARENA's toy model) the model spends
  thousands of steps on partial positional heads in layer 0 before any prefix matching forms,
  beyond a CPU test's budget; with rotary positions a previous-token head is easy to express and
  the induction head forms in a few hundred steps.

Deterministic on CPU for a given ``seed`` (model initialisation, training data, held-out data).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.inspect.capture import capture
from attnzoo.inspect.metrics.induction import induction_score_mul, induction_score_stripe, repeated_tokens

__all__ = ["CURVE_FIELDS", "MUL_THRESHOLD", "POSITIONAL", "STRIPE_THRESHOLD", "half_losses", "induction_batch",
           "induction_emergence"]

STRIPE_THRESHOLD = 0.4
MUL_THRESHOLD = 0.2
POSITIONAL = ("rope", "learned", "sinusoidal", "none")
CURVE_FIELDS = ("step", "stripe", "mul", "head", "stripe_by_layer", "mul_by_layer", "loss_first", "loss_second",
                "train_loss")
_BOS = 0
_IGNORE = -100


def induction_batch(batch: int, seq_len: int, vocab: int, *, min_period: int | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training sequences ``[BOS] + filler + r + r`` and where they can be predicted by copying.

    Returns ``tokens`` ``[batch, 2·seq_len + 1]`` long and ``copyable`` (same shape, bool): True on
    the second copy of ``r`` except its first token (what an induction head can predict). ``r``
    holds ``p`` random tokens from ``1 .. vocab - 1``, ``p`` drawn per sequence from
    ``min_period .. seq_len`` (``min_period=None``: always ``seq_len``, no filler); the
    ``2 (seq_len - p)`` filler tokens are random too. BOS is token 0.
    """
    lo = seq_len if min_period is None else min_period
    if isinstance(lo, bool) or not isinstance(lo, int) or not 2 <= lo <= seq_len:
        raise ValueError(f"min_period: expected an integer in 2 .. seq_len={seq_len} or None, got {min_period!r}")
    n = 2 * seq_len
    body = torch.randint(1, vocab, (batch, n), generator=generator)
    period = torch.randint(lo, seq_len + 1, (batch, 1), generator=generator)
    pos = torch.arange(n)[None]
    second = pos >= n - period                                   # the second copy of r
    body = body.gather(1, torch.where(second, pos - period, pos.expand(batch, n)))
    copyable = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), second & (pos > n - period)], 1)
    return torch.cat([torch.full((batch, 1), _BOS, dtype=torch.long), body], 1), copyable


def half_losses(logits: torch.Tensor, tokens: torch.Tensor, seq_len: int) -> tuple[float, float]:
    """Mean next-token loss on ``r[1:]`` in the first and in the second copy of ``[BOS] + r + r``.

    ``logits`` ``[B, 2T + 1, V]`` (position ``i`` predicts token ``i + 1``), ``tokens`` ``[B, 2T + 1]``
    with ``T = seq_len``. The first token of each copy is left out (nothing before it predicts it).
    """
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    nll = -lp.gather(-1, tokens[:, 1:, None])[..., 0]            # nll[:, i]: loss on tokens[:, i + 1]
    return float(nll[:, 1:seq_len].mean()), float(nll[:, seq_len + 1:].mean())


@torch.no_grad()
def _evaluate(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int) -> dict[str, Any]:
    was = model.training
    model.eval()
    cache = capture(model, tokens, what=("weights",))
    model.train(was)
    stripe = torch.stack([induction_score_stripe(w.double(), seq_len) for w in cache.weights()])  # [L, H]
    mul = torch.stack([induction_score_mul(w.double(), tokens) for w in cache.weights()])
    first, second = half_losses(cache.output, tokens, seq_len)
    layer, head = divmod(int(stripe.argmax()), stripe.shape[1])
    return {"stripe": float(stripe.max()), "mul": float(mul.max()), "head": (layer, head),
            "stripe_by_layer": stripe.amax(1).tolist(), "mul_by_layer": mul.amax(1).tolist(),
            "stripe_per_head": stripe.tolist(), "mul_per_head": mul.tolist(),
            "loss_first": first, "loss_second": second}


def _check_int(name: str, v: Any, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v!r}")


def induction_emergence(n_layers: int = 2, steps: int = 600, seed: int = 0, *, vocab: int = 64, seq_len: int = 12,
                        min_period: int | None = 4, dim: int = 64, n_heads: int = 4, positional: str = "rope",
                        batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 0.0, warmup_steps: int = 100,
                        loss_on: str = "all", eval_every: int = 100, n_eval: int = 32,
                        threads: int | None = 1) -> dict[str, Any]:
    """Train an attention-only TinyLM on repeated random sequences and record its induction scores.

    Model: ``attnzoo.bench.models.TinyLM("mha", vocab_size=vocab, dim=dim, n_layers=n_layers,
    mixer_kwargs={"n_heads": n_heads, "rope": RotaryEmbedding(dim // n_heads)}, positional="none",
    mlp_ratio=0)``: token embedding, ``n_layers`` pre-norm blocks of causal softmax attention and
    nothing else, tied head. ``positional`` ``"learned"`` / ``"sinusoidal"`` / ``"none"`` use the
    bench model's absolute positions (or none) instead of rotary ones.

    Training: AdamW (``lr``, ``weight_decay``), linear warm-up over ``warmup_steps`` then cosine
    decay to 0, a fresh batch of :func:`induction_batch` sequences (period ``min_period ..
    seq_len``) every step, cross-entropy on every next token (``loss_on="all"``) or on the
    copyable tokens only (``loss_on="copyable"``). At step 0, every ``eval_every`` steps and at
    the last step the model is scored on the same ``n_eval`` held-out ``[BOS] + r + r``
    sequences of period ``seq_len`` (:func:`~attnzoo.inspect.metrics.repeated_tokens`).
    ``threads``: ``torch.set_num_threads`` during the run (restored afterwards; ``None`` leaves it).

    Returns a dict:

    * ``"config"``: the arguments (``threads`` left out);
    * ``"curve"``: one row per evaluation with the keys :data:`CURVE_FIELDS`: ``stripe`` / ``mul``
      the best head's score over all layers and heads, ``head`` the ``(layer, head)`` of the best
      stripe score, ``stripe_by_layer`` / ``mul_by_layer`` the best head of each layer,
      ``loss_first`` / ``loss_second`` the held-out loss on the first and second copy
      (:func:`half_losses`), ``train_loss`` the mean training loss since the previous row (None at step 0);
    * ``"final"``: the last row plus ``"stripe_per_head"`` / ``"mul_per_head"`` (``[L][H]`` lists);
    * ``"thresholds"``: ``{"stripe": STRIPE_THRESHOLD, "mul": MUL_THRESHOLD}``;
    * ``"crossed_at"``: ``{"stripe": step, "mul": step}``, the first evaluated step at which the
      score reached its threshold (None if it never did);
    * ``"crossed"``: whether the final stripe and mul scores are both at or above their thresholds;
    * ``"seconds"``: wall time of the run.
    """
    from attnzoo.bench.models import TinyLM

    for name, v in (("n_layers", n_layers), ("steps", steps), ("vocab", vocab), ("seq_len", seq_len),
                    ("dim", dim), ("n_heads", n_heads), ("batch_size", batch_size), ("eval_every", eval_every),
                    ("n_eval", n_eval)):
        _check_int(name, v)
    _check_int("seed", seed, 0)
    _check_int("warmup_steps", warmup_steps, 0)
    if vocab < 3:
        raise ValueError(f"vocab: expected at least 3 tokens (BOS and two others), got {vocab}")
    if positional not in POSITIONAL:
        raise ValueError(f"positional: expected one of {POSITIONAL}, got {positional!r}")
    if loss_on not in ("all", "copyable"):
        raise ValueError(f"loss_on: expected 'all' or 'copyable', got {loss_on!r}")
    if dim % n_heads:
        raise ValueError(f"dim: must be divisible by n_heads={n_heads}, got dim={dim}")
    induction_batch(1, seq_len, vocab, min_period=min_period)    # validates min_period
    config = dict(n_layers=n_layers, steps=steps, seed=seed, vocab=vocab, seq_len=seq_len, min_period=min_period,
                  dim=dim, n_heads=n_heads, positional=positional, batch_size=batch_size, lr=lr,
                  weight_decay=weight_decay, warmup_steps=warmup_steps, loss_on=loss_on, eval_every=eval_every,
                  n_eval=n_eval)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        mixer_kwargs: dict[str, Any] = {"n_heads": n_heads}
        if positional == "rope":
            from attnzoo.layers.rotary import RotaryEmbedding

            mixer_kwargs["rope"] = RotaryEmbedding(dim // n_heads)
        model = TinyLM("mha", vocab_size=vocab, dim=dim, n_layers=n_layers, max_len=2 * seq_len + 1,
                       mixer_kwargs=mixer_kwargs, positional="none" if positional == "rope" else positional,
                       mlp_ratio=0.0)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

        def lr_factor(s: int) -> float:
            if s < warmup_steps:
                return (s + 1) / warmup_steps
            return 0.5 * (1 + math.cos(math.pi * (s - warmup_steps) / max(1, steps - warmup_steps)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        gen = torch.Generator().manual_seed(10_007 * seed + 1)
        eval_tokens = repeated_tokens(n_eval, seq_len, vocab, bos=_BOS, seed=10_007 * seed + 2)
        curve: list[dict[str, Any]] = []
        running: list[float] = []
        last: dict[str, Any] = {}

        def record(step: int) -> None:
            row = _evaluate(model, eval_tokens, seq_len)
            row["step"] = step
            row["train_loss"] = sum(running) / len(running) if running else None
            running.clear()
            curve.append({k: row[k] for k in CURVE_FIELDS})
            last.update(row)

        record(0)
        model.train()
        for step in range(1, steps + 1):
            x, copyable = induction_batch(batch_size, seq_len, vocab, min_period=min_period, generator=gen)
            target = x[:, 1:] if loss_on == "all" else x[:, 1:].masked_fill(~copyable[:, 1:], _IGNORE)
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=_IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running.append(float(loss.detach()))
            if step % eval_every == 0 or step == steps:
                record(step)
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
    final = dict(curve[-1], stripe_per_head=last["stripe_per_head"], mul_per_head=last["mul_per_head"])

    def first(key: str, threshold: float) -> int | None:
        return next((r["step"] for r in curve if r[key] >= threshold), None)

    return {"config": config, "curve": curve, "final": final,
            "thresholds": {"stripe": STRIPE_THRESHOLD, "mul": MUL_THRESHOLD},
            "crossed_at": {"stripe": first("stripe", STRIPE_THRESHOLD), "mul": first("mul", MUL_THRESHOLD)},
            "crossed": final["stripe"] >= STRIPE_THRESHOLD and final["mul"] >= MUL_THRESHOLD,
            "seconds": time.perf_counter() - t0}
