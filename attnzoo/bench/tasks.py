"""Synthetic benchmark tasks, generated offline and seeded.

Every task builds a :class:`TaskData` with :meth:`Task.generate` (``n`` examples from a seed)
and scores model outputs with :meth:`Task.score` (one score per example; the task's metric is
their mean). Three kinds:

- ``"lm"``: next-token tasks for a causal language model. ``labels`` ``[E, L]`` are aligned
  with ``inputs``: ``labels[e, t]`` is what the model must predict from ``inputs[e, :t+1]``;
  ``-100`` means "no label here". Metric: Zoology's rule, the per-example accuracy over the
  labelled positions, averaged over examples.
- ``"classify"``: one class per sequence (``labels`` ``[E]``), ``mask`` marks real tokens.
- ``"regress"``: one real target per sequence (``labels`` ``[E]``); ``inputs`` are float
  ``[E, L, F]``. Metric: squared error divided by the input dimension (lower is better).
- ``"bag"``: one class per bag or set of float instances ``[E, L, F]`` (``mask`` marks real ones),
  for a pooler in a bag classifier (:mod:`attnzoo.bench.pooling_tasks`). Metric: accuracy.

A task may report more than its metric: :attr:`Task.secondary_metrics` names what
:meth:`Task.extra_metrics` computes from the trained model (the MIL task's bag and localisation AUC).

Tasks: ``mqar`` (Zoology's multi-query associative recall, exactly as in
``zoology/data/multiquery_ar.py``), ``induction``, ``selective_copy``,
``icl_linear_regression`` and LRA ``listops``. ``mqar`` and ``icl_linear_regression`` are also
catalogue entries in :mod:`attnzoo.registry` (type ``task``): ``attnzoo.create("mqar", seq_len=128,
num_kv_pairs=8)``.
"""

from __future__ import annotations

import difflib
import inspect
import random
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from attnzoo.registry import Reduction, register

__all__ = [
    "TASKS", "Task", "TaskData", "MQAR", "Induction", "SelectiveCopy", "ICLLinearRegression", "ListOps",
    "MQAR_PAPER_CONFIGS", "get_task", "lm_accuracy", "ridge_predict",
]

IGNORE = -100
# Zoology Figure 2: (input_seq_len, num_kv_pairs).
MQAR_PAPER_CONFIGS: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16), (512, 64))


@dataclass
class TaskData:
    """Generated examples. ``inputs`` ``[E, L]`` int64 tokens (``[E, L, F]`` float for regression);
    ``labels`` ``[E, L]`` int64 (``lm``; ``-100`` = none) or ``[E]`` (``classify``/``regress``);
    ``mask`` ``[E, L]`` bool, True = real token (None when every token is real)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: torch.Tensor | slice) -> TaskData:
        return TaskData(self.inputs[index], self.labels[index], None if self.mask is None else self.mask[index])

    def to(self, device: torch.device | str) -> TaskData:
        return TaskData(self.inputs.to(device), self.labels.to(device),
                        None if self.mask is None else self.mask.to(device))


def lm_accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Zoology's rule: per example, the mean of ``pred == label`` over positions with a label.

    ``logits_or_preds`` ``[E, L, V]`` logits or ``[E, L]`` predictions; returns ``[E]`` float64
    (NaN for an example without any label, which the mean over examples leaves out).
    """
    preds = logits_or_preds.argmax(-1) if logits_or_preds.dim() == labels.dim() + 1 else logits_or_preds
    has = labels != IGNORE
    hits = ((preds == labels) & has).sum(-1).double()
    count = has.sum(-1).double()
    return torch.where(count > 0, hits / count.clamp(min=1), torch.full_like(hits, float("nan")))


class Task:
    """Base class of the benchmark tasks (a dataclass subclass per task)."""

    name: ClassVar[str]
    kind: ClassVar[str]               # "lm" | "classify" | "regress" | "bag"
    causal: ClassVar[bool] = True     # the model runs its mixers causally
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    secondary_metrics: ClassVar[tuple[str, ...]] = ()   # what extra_metrics() returns (higher is better)
    seq_len: int

    # Shapes the model needs --------------------------------------------------------------
    @property
    def vocab_size_in(self) -> int | None:
        """Input vocabulary (None for float inputs)."""
        return getattr(self, "vocab_size", None)

    @property
    def n_outputs(self) -> int:
        """Width of the model's output head."""
        return int(getattr(self, "vocab_size", 1))

    @property
    def n_features(self) -> int | None:
        return None

    def needs(self) -> frozenset[str]:
        """Capabilities a mixer must declare (:data:`attnzoo.registry.SUPPORTS`) to run this task."""
        return frozenset({"self", "causal"}) if self.causal else frozenset({"self"})

    # Data ----------------------------------------------------------------------------------
    def generate(self, n: int, seed: int) -> TaskData:
        raise NotImplementedError

    def splits(self, n_train: int, n_test: int, seed: int = 0) -> tuple[TaskData, TaskData]:
        """Train and test sets from distinct seeds (``seed`` and ``seed + 1``)."""
        return self.generate(n_train, seed), self.generate(n_test, seed + 1)

    def score(self, outputs: torch.Tensor, data: TaskData) -> torch.Tensor:
        """Per-example scores ``[E]`` (float64); the task's metric is their mean."""
        if self.kind == "lm":
            return lm_accuracy(outputs, data.labels)
        if self.kind in ("classify", "bag"):
            return (outputs.argmax(-1) == data.labels).double()
        return (outputs.double().reshape(-1) - data.labels.double()).pow(2) / max(1, self.n_features - 1)

    def extra_metrics(self, model: torch.nn.Module, data: TaskData, *,
                      device: torch.device | str = "cpu") -> dict[str, float | None]:
        """The :attr:`secondary_metrics` of a trained ``model`` on ``data`` (None where one does not apply)."""
        return {}

    # Description ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-friendly parameters (the dataclass fields) plus the task name."""
        return {"task": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore[arg-type]

    def label(self) -> str:
        """Short human-readable name, e.g. ``mqar(seq_len=64, num_kv_pairs=4)``."""
        keys = getattr(self, "label_keys", ("seq_len",))
        return f"{self.name}(" + ", ".join(f"{k}={getattr(self, k)}" for k in keys) + ")"


def _numpy() -> Any:
    try:
        import numpy
    except ImportError as e:  # pragma: no cover - numpy is a dependency of attnzoo
        raise ImportError("the mqar generator needs numpy (pip install numpy)") from e
    return numpy


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_n_seed(n: Any, seed: Any) -> None:
    _positive("n", n)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")


# --------------------------------------------------------------------------------------------
# MQAR
# --------------------------------------------------------------------------------------------
@dataclass
class MQAR(Task):
    """Zoology's multi-query associative recall (``zoology/data/multiquery_ar.py``).

    Per example (NumPy ``RandomState(seed)``, drawn in the reference's order: every example's
    keys, then every example's values, then every example's gaps): ``num_kv_pairs`` keys from
    ``1 .. vocab/2 - 1`` and values from ``vocab/2 .. vocab - 1``, each without replacement;
    context ``k1 v1 k2 v2 ...`` (tiled ``num_passes`` times); each key queried once at
    ``context + 2 * gap`` with gaps drawn without replacement from ``0 .. space - 1``,
    ``space = (seq_len - context) // 2``, with ``p[g] ∝ a (g + 1)^(a - 1)``, ``a = power_a``;
    the label at a query is its key's value, every other label is ``-100``. Filler tokens are
    0, or uniform over the whole vocabulary when ``random_non_queries`` (a seeded torch draw).
    With ``random_non_queries=False`` (Zoology's Figure 2) the examples equal the reference's
    under ``np.random.seed(seed)``.
    """

    seq_len: int = 64
    num_kv_pairs: int = 4
    vocab_size: int = 8192
    power_a: float = 0.01
    random_non_queries: bool = True
    num_passes: int = 1

    name: ClassVar[str] = "mqar"
    kind: ClassVar[str] = "lm"
    label_keys: ClassVar[tuple[str, ...]] = ("seq_len", "num_kv_pairs")

    def __post_init__(self) -> None:
        _positive("seq_len", self.seq_len, 2)
        _positive("num_kv_pairs", self.num_kv_pairs)
        _positive("vocab_size", self.vocab_size, 4)
        _positive("num_passes", self.num_passes)
        if self.seq_len % 2:
            raise ValueError(f"seq_len: must be even, got {self.seq_len}")
        if self.vocab_size <= self.seq_len:
            raise ValueError(f"vocab_size: must exceed seq_len={self.seq_len}, got {self.vocab_size}")
        need = self.num_kv_pairs * 2 * self.num_passes + self.num_kv_pairs * 2
        if need > self.seq_len:
            raise ValueError(f"num_kv_pairs: 2*num_kv_pairs*(num_passes+1) = {need} must be <= seq_len={self.seq_len}")
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"num_kv_pairs: at most vocab_size//2 - 1 = {self.vocab_size // 2 - 1}")
        if not (isinstance(self.power_a, (int, float)) and self.power_a > 0):
            raise ValueError(f"power_a: expected a positive number, got {self.power_a!r}")

    @classmethod
    def paper(cls, seq_len: int) -> MQAR:
        """Zoology Figure 2's setting for ``seq_len`` in 64, 128, 256, 512 (filler = token 0)."""
        pairs = dict(MQAR_PAPER_CONFIGS)
        if seq_len not in pairs:
            raise ValueError(f"seq_len: Zoology's Figure 2 uses {sorted(pairs)}, got {seq_len!r}")
        return cls(seq_len=seq_len, num_kv_pairs=pairs[seq_len], random_non_queries=False)

    def gap_probabilities(self) -> Any:
        """``p`` over gaps ``0 .. space - 1`` (the power law of the reference), a NumPy array."""
        np = _numpy()
        space = (self.seq_len - self.num_kv_pairs * 2 * self.num_passes) // 2
        p = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
        return p / p.sum()

    def generate(self, n: int, seed: int) -> TaskData:
        _check_n_seed(n, seed)
        np = _numpy()
        rs = np.random.RandomState(seed)
        pairs, vocab = self.num_kv_pairs, self.vocab_size
        context = pairs * 2 * self.num_passes
        key_choices = np.arange(1, vocab // 2)
        value_choices = np.arange(vocab // 2, vocab)
        keys = np.stack([rs.choice(key_choices, size=pairs, replace=False) for _ in range(n)])
        values = np.stack([rs.choice(value_choices, size=pairs, replace=False) for _ in range(n)])
        kv = np.zeros((n, 2 * pairs), dtype=np.int64)
        kv[:, 0::2], kv[:, 1::2] = keys, values
        kvs = np.tile(kv, (1, self.num_passes))
        p = self.gap_probabilities()
        space = len(p)
        gaps = np.stack([rs.choice(np.arange(space), size=pairs, replace=False, p=p) for _ in range(n)])
        queries = np.zeros((n, self.seq_len - context + 1), dtype=np.int64)
        np.put_along_axis(queries, gaps * 2, keys, axis=1)
        examples = np.concatenate([kvs, queries], axis=1)
        labels = np.full((n, self.seq_len + 1), IGNORE, dtype=np.int64)
        np.put_along_axis(labels, gaps * 2 + context + 1, values, axis=1)
        inputs, targets = torch.from_numpy(examples[:, :-1].copy()), torch.from_numpy(labels[:, 1:].copy())
        if self.random_non_queries:
            g = torch.Generator().manual_seed(seed)
            filler = inputs == 0
            inputs[filler] = torch.randint(vocab, inputs.shape, generator=g)[filler]
        return TaskData(inputs, targets)

    def oracle(self, data: TaskData) -> torch.Tensor:
        """Exact-lookup predictions ``[E, L]``: at each query, the token after the key's first occurrence."""
        preds = torch.zeros_like(data.labels)
        context = self.num_kv_pairs * 2 * self.num_passes
        for e, t in (data.labels != IGNORE).nonzero().tolist():
            key = data.inputs[e, t]
            first = int((data.inputs[e, :context] == key).nonzero()[0, 0])
            preds[e, t] = data.inputs[e, first + 1]
        return preds


# --------------------------------------------------------------------------------------------
# Induction
# --------------------------------------------------------------------------------------------
@dataclass
class Induction(Task):
    """Induction: ``[BOS] r r`` with ``r`` random tokens (distinct within an example).

    ``r`` has ``seq_len // 2`` tokens from ``1 .. vocab_size - 1``; BOS is token 0. Inputs are
    the first ``seq_len`` tokens; a label sits on every position of the second copy whose next
    token can be copied from the first occurrence (all but the copy's first token).
    """

    seq_len: int = 64
    vocab_size: int = 128

    name: ClassVar[str] = "induction"
    kind: ClassVar[str] = "lm"

    def __post_init__(self) -> None:
        _positive("seq_len", self.seq_len, 4)
        if self.seq_len % 2:
            raise ValueError(f"seq_len: must be even, got {self.seq_len}")
        if self.vocab_size - 1 < self.seq_len // 2:
            raise ValueError(f"vocab_size: needs at least seq_len//2 + 1 = {self.seq_len // 2 + 1} "
                             f"tokens for distinct repeats, got {self.vocab_size}")

    def generate(self, n: int, seed: int) -> TaskData:
        _check_n_seed(n, seed)
        g = torch.Generator().manual_seed(seed)
        m = self.seq_len // 2
        r = torch.argsort(torch.rand(n, self.vocab_size - 1, generator=g), dim=1)[:, :m] + 1
        seq = torch.cat([torch.zeros(n, 1, dtype=torch.long), r, r], dim=1)  # [n, 2m + 1]
        inputs, nxt = seq[:, :-1], seq[:, 1:]
        labels = torch.full_like(inputs, IGNORE)
        labels[:, m + 1:] = nxt[:, m + 1:]
        return TaskData(inputs, labels)


# --------------------------------------------------------------------------------------------
# Selective copy
# --------------------------------------------------------------------------------------------
@dataclass
class SelectiveCopy(Task):
    """Selective copying (Mamba): ``n_tokens`` data tokens scattered among noise, then recalled in order.

    Tokens: 0 noise, 1 marker, ``2 .. n_symbols + 1`` data. The first ``seq_len - n_tokens``
    positions hold the data tokens at random sorted positions (noise elsewhere); the last
    ``n_tokens`` positions are markers labelled with the data tokens in order.
    """

    seq_len: int = 64
    n_tokens: int = 8
    n_symbols: int = 16

    name: ClassVar[str] = "selective_copy"
    kind: ClassVar[str] = "lm"
    label_keys: ClassVar[tuple[str, ...]] = ("seq_len", "n_tokens")

    def __post_init__(self) -> None:
        _positive("n_tokens", self.n_tokens)
        _positive("n_symbols", self.n_symbols, 2)
        _positive("seq_len", self.seq_len, 2 * self.n_tokens)

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2

    def generate(self, n: int, seed: int) -> TaskData:
        _check_n_seed(n, seed)
        g = torch.Generator().manual_seed(seed)
        ctx, k = self.seq_len - self.n_tokens, self.n_tokens
        pos = torch.argsort(torch.rand(n, ctx, generator=g), dim=1)[:, :k].sort(dim=1).values
        data = torch.randint(2, self.n_symbols + 2, (n, k), generator=g)
        inputs = torch.zeros(n, self.seq_len, dtype=torch.long)
        inputs.scatter_(1, pos, data)
        inputs[:, ctx:] = 1
        labels = torch.full_like(inputs, IGNORE)
        labels[:, ctx:] = data
        return TaskData(inputs, labels)


# --------------------------------------------------------------------------------------------
# In-context linear regression
# --------------------------------------------------------------------------------------------
def ridge_predict(inputs: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge regression on each sequence's context, evaluated at its query: ``[E]``.

    ``inputs`` ``[E, n + 1, d + 1]`` (tokens ``[x_i; y_i]``, the last one ``[x_q; 0]``).
    ``lam = noise_std**2`` is Bayes-optimal under ``w ~ N(0, I)``; ``lam = 0`` is least squares.
    """
    x, y, xq = inputs[:, :-1, :-1].double(), inputs[:, :-1, -1].double(), inputs[:, -1, :-1].double()
    d = x.shape[-1]
    if lam > 0:
        gram = x.transpose(1, 2) @ x + lam * torch.eye(d, dtype=torch.float64)
        w = torch.linalg.solve(gram, (x.transpose(1, 2) @ y.unsqueeze(-1))).squeeze(-1)
    else:
        w = torch.linalg.lstsq(x, y.unsqueeze(-1)).solution.squeeze(-1)
    return (w * xq).sum(-1)


@dataclass
class ICLLinearRegression(Task):
    """In-context linear regression ("In-Context Linear Regression Demystified").

    Per sequence ``w ~ N(0, I_d)``, ``x_i ~ N(0, Σ)``, ``y_i = wᵀx_i + ε`` (``ε ~ N(0, noise_std²)``);
    tokens ``z_i = [x_i; y_i]`` for ``n_points`` context pairs, then the query ``[x_q; 0]``; the
    target is ``y_q``. ``covariance`` is ``"isotropic"`` (Σ = I) or ``"skewed"`` (eigenvalues
    ∝ 1/i, scaled to trace d, in a random rotation fixed by the seed). ``seq_len = n_points + 1``.
    Metric: squared error / d (1.0 = always predicting 0 when Σ = I and noise is 0).
    """

    n_dims: int = 8
    n_points: int = 32
    noise_std: float = 0.0
    covariance: str = "isotropic"

    name: ClassVar[str] = "icl_linear_regression"
    kind: ClassVar[str] = "regress"
    metric: ClassVar[str] = "mse"
    higher_is_better: ClassVar[bool] = False
    label_keys: ClassVar[tuple[str, ...]] = ("n_dims", "n_points")

    def __post_init__(self) -> None:
        _positive("n_dims", self.n_dims)
        _positive("n_points", self.n_points)
        if not (isinstance(self.noise_std, (int, float)) and self.noise_std >= 0):
            raise ValueError(f"noise_std: expected a number >= 0, got {self.noise_std!r}")
        if self.covariance not in ("isotropic", "skewed"):
            raise ValueError(f"covariance: expected one of ('isotropic', 'skewed'), got {self.covariance!r}")

    @property
    def seq_len(self) -> int:  # type: ignore[override]
        return self.n_points + 1

    @property
    def n_features(self) -> int:
        return self.n_dims + 1

    @property
    def n_outputs(self) -> int:
        return 1

    def covariance_root(self, seed: int) -> torch.Tensor:
        """``S`` with ``x = S g``, ``g ~ N(0, I)`` (so ``Σ = S Sᵀ``), float64 ``[d, d]``."""
        d = self.n_dims
        if self.covariance == "isotropic":
            return torch.eye(d, dtype=torch.float64)
        g = torch.Generator().manual_seed(seed + 7919)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        eig = 1.0 / torch.arange(1, d + 1, dtype=torch.float64)
        eig = eig * d / eig.sum()
        return q * eig.sqrt()

    def generate(self, n: int, seed: int) -> TaskData:
        _check_n_seed(n, seed)
        g = torch.Generator().manual_seed(seed)
        d, m = self.n_dims, self.n_points
        root = self.covariance_root(seed)
        w = torch.randn(n, d, generator=g, dtype=torch.float64)
        x = torch.randn(n, m + 1, d, generator=g, dtype=torch.float64) @ root.T
        y = (x * w.unsqueeze(1)).sum(-1) + self.noise_std * torch.randn(n, m + 1, generator=g, dtype=torch.float64)
        tokens = torch.cat([x, y.unsqueeze(-1)], dim=-1)
        tokens[:, -1, -1] = 0.0
        return TaskData(tokens.float(), y[:, -1].float())

    def ridge_error(self, data: TaskData) -> float:
        """The metric of the Bayes-optimal ridge predictor (``λ = noise_std²``) on ``data``."""
        pred = ridge_predict(data.inputs, self.noise_std ** 2)
        return float(self.score(pred, data).mean())


# --------------------------------------------------------------------------------------------
# LRA ListOps
# --------------------------------------------------------------------------------------------
LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_END = "]"
LISTOPS_VALUE_P = 0.25
# Token ids: 0 pad, 1 CLS, 2..11 digits, then the operators, then "]" (LRA's "X").
LISTOPS_VOCAB = ("<pad>", "<cls>", *[str(i) for i in range(10)], *LISTOPS_OPERATORS, LISTOPS_END)


def _listops_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> tuple[Any, int]:
    """LRA's ``generate_tree``: the same draws in the same order; returns (tree, length)."""
    r = rng.random() if depth < max_depth else 1
    if r > LISTOPS_VALUE_P:
        return rng.choice(range(10)), 1
    length = 2
    children = []
    for _ in range(rng.randint(2, max_args)):
        sub, sub_len = _listops_tree(rng, depth + 1, max_depth, max_args)
        children.append(sub)
        length += sub_len
    op = rng.choice(LISTOPS_OPERATORS)
    return (op, tuple(children)), length


def listops_value(tree: Any) -> int:
    """The value of a ListOps tree (MIN, MAX, MED = ``int(np.median)``, SM = sum mod 10)."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    vals = [listops_value(c) for c in children]
    if op == "[MIN":
        return min(vals)
    if op == "[MAX":
        return max(vals)
    if op == "[MED":  # int(np.median(vals)): the mean of the two middle values, truncated
        ordered = sorted(vals)
        return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) // 2
    return sum(vals) % 10


def listops_tokens(tree: Any) -> list[str]:
    """The token sequence after LRA's pipeline (parentheses stripped): ``[MAX 2 9 ]``."""
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    out = [op]
    for c in children:
        out += listops_tokens(c)
    return out + [LISTOPS_END]


@dataclass
class ListOps(Task):
    """LRA ListOps from its generator rules (``lra_benchmarks/data/listops.py``), offline.

    Trees from ``generate_tree(1, max_depth, max_args)``: below ``max_depth`` a node is a
    value 0-9 with probability 0.75, else one of MIN, MAX, MED, SM with ``randint(2,
    max_args)`` children; a tree is kept when ``min_length < length < max_length`` (1 per
    value, 2 per operator) and samples are de-duplicated. Ten classes (the value). Inputs
    are ``[CLS] tokens`` padded to ``seq_len = max_length`` with ``mask`` marking real tokens.
    LRA's defaults are ``max_depth=10, max_args=10, min_length=500, max_length=2000``.
    """

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000

    name: ClassVar[str] = "listops"
    kind: ClassVar[str] = "classify"
    causal: ClassVar[bool] = False
    label_keys: ClassVar[tuple[str, ...]] = ("min_length", "max_length")

    def __post_init__(self) -> None:
        _positive("max_depth", self.max_depth)
        _positive("max_args", self.max_args, 2)
        _positive("min_length", self.min_length, 0)
        _positive("max_length", self.max_length, self.min_length + 2)

    @property
    def seq_len(self) -> int:  # type: ignore[override]
        return self.max_length  # CLS + at most max_length - 1 tokens

    @property
    def vocab_size(self) -> int:
        return len(LISTOPS_VOCAB)

    @property
    def n_outputs(self) -> int:
        return 10

    def trees(self, n: int, seed: int) -> list[Any]:
        """``n`` distinct trees within the length bounds (LRA's rejection loop)."""
        _check_n_seed(n, seed)
        rng = random.Random(seed)
        seen: set[Any] = set()
        out = []
        tries = 0
        while len(out) < n:
            tree, length = _listops_tree(rng, 1, self.max_depth, self.max_args)
            tries += 1
            if self.min_length < length < self.max_length and tree not in seen:
                seen.add(tree)
                out.append(tree)
            elif tries > 1000 * n + 100_000:
                raise ValueError(f"listops: could not draw {n} distinct trees with {self.min_length} < length < "
                                 f"{self.max_length} (max_depth={self.max_depth}); widen the bounds")
        return out

    def encode(self, trees: list[Any]) -> TaskData:
        ids = {t: i for i, t in enumerate(LISTOPS_VOCAB)}
        inputs = torch.zeros(len(trees), self.seq_len, dtype=torch.long)
        mask = torch.zeros(len(trees), self.seq_len, dtype=torch.bool)
        labels = torch.empty(len(trees), dtype=torch.long)
        for i, tree in enumerate(trees):
            toks = [1] + [ids[t] for t in listops_tokens(tree)]
            inputs[i, :len(toks)] = torch.tensor(toks)
            mask[i, :len(toks)] = True
            labels[i] = listops_value(tree)
        return TaskData(inputs, labels, mask)

    def generate(self, n: int, seed: int) -> TaskData:
        return self.encode(self.trees(n, seed))

    def splits(self, n_train: int, n_test: int, seed: int = 0) -> tuple[TaskData, TaskData]:
        """Disjoint train and test sets from one de-duplicated draw (as LRA does)."""
        data = self.generate(n_train + n_test, seed)
        return data.subset(slice(0, n_train)), data.subset(slice(n_train, n_train + n_test))


# --------------------------------------------------------------------------------------------
# The task table and the registry entries
# --------------------------------------------------------------------------------------------
TASKS: dict[str, type[Task]] = {t.name: t for t in (MQAR, Induction, SelectiveCopy, ICLLinearRegression, ListOps)}


def get_task(name: str, **kwargs: Any) -> Task:
    """Build task ``name`` with ``kwargs``; unknown names or arguments raise listing the valid ones."""
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), TASKS, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"task: unknown task {name!r}{hint}; valid tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    accepted = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; valid options: {', '.join(accepted)}")
    return cls(**kwargs)


def _mqar_oracle_is_exact() -> tuple[torch.Tensor, torch.Tensor]:
    task = MQAR(seq_len=64, num_kv_pairs=4)
    data = task.generate(64, seed=3)
    return lm_accuracy(task.oracle(data), data.labels).mean(), torch.tensor(1.0, dtype=torch.float64)


def _mqar_seeded() -> tuple[torch.Tensor, torch.Tensor]:
    task = MQAR.paper(128)
    a, b = task.generate(16, seed=5), task.generate(16, seed=5)
    return torch.cat([a.inputs, a.labels]).double(), torch.cat([b.inputs, b.labels]).double()


@register(
    "mqar", family="benchmark", type="task", priority=1, papers=("Zoology (MQAR)",), supports=(),
    complexity="n/a", backends=(),
    reference="an exact-lookup oracle (the token after the key's first occurrence) scores 1.0",
    reference_kwargs={}, reductions=(
        Reduction("oracle", "an exact-lookup oracle scores 100% (each queried key appears once earlier, "
                  "with its value)", _mqar_oracle_is_exact),
        Reduction("seeded", "the same seed gives the same examples", _mqar_seeded),
    ),
    summary="Zoology's multi-query associative recall (vocab 8192, power-law query gaps); "
            "MQAR.paper(seq_len) gives Figure 2's settings",
)
def mqar(seq_len: int = 64, num_kv_pairs: int = 4, vocab_size: int = 8192, power_a: float = 0.01,
         random_non_queries: bool = True, num_passes: int = 1) -> MQAR:
    """Multi-query associative recall task (see :class:`attnzoo.bench.tasks.MQAR`)."""
    return MQAR(seq_len=seq_len, num_kv_pairs=num_kv_pairs, vocab_size=vocab_size, power_a=power_a,
                random_non_queries=random_non_queries, num_passes=num_passes)


def _icl_least_squares_exact() -> tuple[torch.Tensor, torch.Tensor]:
    # float64 tokens (generate() stores float32), 25 points in 6 dimensions, no noise
    g = torch.Generator().manual_seed(11)
    w = torch.randn(32, 6, generator=g, dtype=torch.float64)
    x = torch.randn(32, 25, 6, generator=g, dtype=torch.float64)
    y = (x * w.unsqueeze(1)).sum(-1)
    tokens = torch.cat([x, y.unsqueeze(-1)], dim=-1)
    tokens[:, -1, -1] = 0.0
    return ridge_predict(tokens, 0.0), y[:, -1]


def _icl_seeded() -> tuple[torch.Tensor, torch.Tensor]:
    task = ICLLinearRegression(covariance="skewed", noise_std=0.1)
    a, b = task.generate(8, seed=2), task.generate(8, seed=2)
    return a.inputs.double(), b.inputs.double()


@register(
    "icl_linear_regression", family="benchmark", type="task", priority=2,
    papers=("ICL linear regression demystified",), supports=(), complexity="n/a", backends=(),
    reference="ridge regression on the context with λ = σ² (Bayes-optimal under w ~ N(0, I)); "
              "least squares is exact without noise when n >= d",
    reference_kwargs={}, reductions=(
        Reduction("least_squares", "no noise and n >= d: least squares on the context recovers y_q exactly",
                  _icl_least_squares_exact),
        Reduction("seeded", "the same seed gives the same sequences", _icl_seeded),
    ),
    summary="sequences of (x, wᵀx) tokens and a query [x_q; 0]; predict y_q (isotropic or skewed covariates)",
)
def icl_linear_regression(n_dims: int = 8, n_points: int = 32, noise_std: float = 0.0,
                          covariance: str = "isotropic") -> ICLLinearRegression:
    """In-context linear regression task (see :class:`attnzoo.bench.tasks.ICLLinearRegression`)."""
    return ICLLinearRegression(n_dims=n_dims, n_points=n_points, noise_std=noise_std, covariance=covariance)


def task_options(name: str) -> dict[str, Any]:
    """Option name -> default of task ``name`` (for the command line)."""
    cls = TASKS[name]
    sig = inspect.signature(cls)
    return {k: p.default for k, p in sig.parameters.items()}

