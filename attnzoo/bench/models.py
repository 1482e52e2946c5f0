"""Tiny models around any registered token mixer: a language model and an encoder classifier.

Both are Zoology-style stacks: input embedding (tokens, or a linear map of float features),
a positional choice (``"learned"``, ``"sinusoidal"`` or ``"none"``), ``n_layers`` pre-norm
blocks ``x += mixer(norm(x))`` (and ``x += mlp(norm(x))`` when ``mlp_ratio > 0``; Zoology's
MQAR models use none), a final norm and a linear head (tied to the token embedding in the
language model, as Zoology). Weights start from Zoology's initialisation (:func:`zoology_init`).
The mixer is built by :func:`build_mixer`: ``attnzoo.create(slug, dim=dim, **mixer_kwargs)`` for a
mixer, pattern or memory entry (e.g. ``sliding_window``), or the entry inside a host ``mha`` for a
score modifier; keyword arguments it does not accept are an error naming the accepted ones.

:func:`build_model` checks, before anything is trained, that the mixer declares what the task
needs (``causal`` for a language model, ``self`` for an encoder): a non-causal mixer in a
language model is an error. A bag task (``task.kind == "bag"``: :mod:`attnzoo.bench.pooling_tasks`)
gets a :class:`BagClassifier` around a registered pooler instead; :func:`check_entry` says, for any
task, whether an entry can be its model's mechanism (a mixer for a sequence task, a pooler for a bag task).
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch
from torch import nn

import attnzoo
from attnzoo.bench.tasks import Task
from attnzoo.bench.variants import merge_kwargs, parse_mixer
from attnzoo.contracts import TOKEN_MIXER, hosted

__all__ = ["BagClassifier", "Block", "EncoderClassifier", "SmallCNN", "TinyDiT", "TinyLM", "build_mixer",
           "build_model", "check_entry", "check_mixer", "check_pooler", "ddim_sample", "mixer_kwargs_for",
           "mixer_slugs", "pooler_slugs", "POSITIONAL"]

POSITIONAL = ("learned", "sinusoidal", "none")


def _usable(spec: Any) -> bool:
    return TOKEN_MIXER.applies(spec)


def mixer_slugs() -> list[str]:
    """Slugs (and aliases) usable as token mixers: mixer, pattern and memory entries (their factory
    builds the mixer), and score modifiers with a host ``mha``."""
    from attnzoo.registry import aliases

    usable = {s.slug for s in attnzoo.list() if _usable(s)}
    return sorted(usable | {a for a, t in aliases().items() if t in usable})


def check_mixer(slug: str, needs: frozenset[str] | set[str] = frozenset(), *, what: str = "this task") -> Any:
    """The entry's :class:`~attnzoo.registry.Spec`; ``ValueError`` if it is unknown, cannot act as a token
    mixer, or does not declare every capability in ``needs`` (e.g. ``{"causal"}``). ``slug`` may be a variant
    label (``moba[top_k=1]``, :mod:`attnzoo.bench.variants`): its entry is checked, its arguments parsed."""
    if isinstance(slug, str) and "[" in slug:
        return check_mixer(parse_mixer(slug).slug, needs, what=what)
    valid = mixer_slugs()
    try:
        spec = attnzoo.spec(slug)
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(slug), valid, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"mixer: unknown mixer {slug!r}{hint}; registered mixers: {', '.join(valid)}") from None
    if not _usable(spec):
        bags = f" (poolers run on the bag tasks: {', '.join(_bag_tasks())})" if spec.type == "pooler" else ""
        raise ValueError(f"mixer: {slug!r} is a {spec.type}, not a token mixer{bags}; registered mixers: "
                         f"{', '.join(valid)}")
    missing = sorted(set(needs) - set(spec.supports))
    if missing:
        raise ValueError(
            f"mixer {slug!r} cannot run {what}: it needs {sorted(needs)} but {slug!r} declares "
            f"{sorted(spec.supports)} (missing {missing})"
        )
    return spec


def pooler_slugs() -> list[str]:
    """Slugs (and aliases) of the registered poolers: what a bag task's model pools with."""
    from attnzoo.registry import aliases

    usable = {s.slug for s in attnzoo.list(type="pooler")}
    return sorted(usable | {a for a, t in aliases().items() if t in usable})


def _bag_tasks() -> list[str]:
    from attnzoo.bench.tasks import TASKS

    return sorted(name for name, cls in TASKS.items() if cls.kind == "bag")


def check_pooler(slug: str, *, what: str = "a bag task") -> Any:
    """The entry's :class:`~attnzoo.registry.Spec`; ``ValueError`` if it is unknown or not a pooler (a variant
    label, ``abmil[attn_dim=16]``, is checked as its entry)."""
    if isinstance(slug, str) and "[" in slug:
        return check_pooler(parse_mixer(slug).slug, what=what)
    valid = pooler_slugs()
    try:
        spec = attnzoo.spec(slug)
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(slug), valid, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"pooler: unknown pooler {slug!r}{hint}; registered poolers: {', '.join(valid)}") from None
    if spec.type != "pooler":
        raise ValueError(f"pooler: {what} pools each bag into one vector, so it takes a pooler, not a {spec.type} "
                         f"({slug!r}); registered poolers: {', '.join(valid)}")
    return spec


def check_entry(slug: str, task: Task) -> Any:
    """The :class:`~attnzoo.registry.Spec` of the mechanism ``slug`` in ``task``'s model: a pooler for a bag
    task (:func:`check_pooler`), else a token mixer declaring what the task needs (:func:`check_mixer`)."""
    if task.kind == "bag":
        return check_pooler(slug, what=f"task {task.name!r}")
    return check_mixer(slug, task.needs(), what=f"task {task.name!r}")


def build_mixer(slug: str, dim: int, **kwargs: Any) -> nn.Module:
    """``attnzoo.create(slug, dim=dim, **kwargs)`` for a mixer (and a pattern or memory entry, whose
    factory builds its mixer); for a score modifier, the entry built from ``kwargs`` inside a host
    :class:`~attnzoo.layers.MultiHeadAttention` of width
    ``dim`` (``n_heads`` and ``backend`` go to the host; ``head_dim``/``n_heads`` are passed on to the
    entry when it takes them). Unknown arguments raise ``ValueError`` naming the accepted ones. A variant label
    (``moba[top_k=1]``) builds its entry with its arguments and ``kwargs`` (a clash is a ``ValueError``)."""
    spec = check_mixer(slug)
    if "[" in slug:
        variant = parse_mixer(slug)
        slug, kwargs = variant.slug, merge_kwargs(variant, kwargs)
    try:
        if not hosted(spec):
            return attnzoo.create(slug, dim=dim, **kwargs)
        from attnzoo.layers import MultiHeadAttention

        n_heads = kwargs.pop("n_heads", 8)
        host_kw = {k: kwargs.pop(k) for k in ("backend", "bias") if k in kwargs}
        accepted = spec.accepted_arguments() or []
        if "head_dim" in accepted and "head_dim" not in kwargs:
            kwargs["head_dim"] = dim // n_heads
        for name in ("n_heads", "heads"):
            if name in accepted and name not in kwargs:
                kwargs[name] = n_heads
        inner = attnzoo.create(slug, **kwargs)
        return MultiHeadAttention(dim, n_heads, **host_kw, **spec.host(inner))
    except TypeError as e:
        raise ValueError(f"mixer {slug!r}: {e}") from None


def mixer_kwargs_for(slug: str, *, n_heads: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``extra``, plus ``n_heads`` when the mixer (or the host of a pattern) takes it and ``extra`` does not set it.
    For a variant label (``mha[n_heads=2]``) its own arguments count as set (and are included)."""
    kwargs = dict(extra or {})
    if "[" in slug:
        variant = parse_mixer(slug)
        slug, kwargs = variant.slug, merge_kwargs(variant, kwargs)
    spec = attnzoo.spec(slug)
    accepted = spec.accepted_arguments()
    takes = hosted(spec) or accepted is None or "n_heads" in accepted
    if n_heads is not None and "n_heads" not in kwargs and takes:
        kwargs["n_heads"] = n_heads
    return kwargs


def _sinusoidal(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    out = torch.zeros(n, dim, dtype=torch.float64)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out.float()


def zoology_init(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """Zoology's initialisation: every ``Linear``/``Embedding`` weight ~ N(0, std), biases 0, and the
    output projections (``o_proj``/``out_proj``/``fc2``, the MLP's second layer) N(0, std / sqrt(2 n_layers))."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith(("o_proj.weight", "out_proj.weight", "fc2.weight", "mlp.2.weight")):
            nn.init.normal_(p, std=std / math.sqrt(2 * n_layers))


class Block(nn.Module):
    """Pre-norm block: ``x += drop(mixer(norm(x)))``, then ``x += mlp(norm(x))`` if there is an MLP."""

    def __init__(self, dim: int, mixer: nn.Module, *, mlp_ratio: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.drop = nn.Dropout(dropout)
        hidden = int(round(dim * mlp_ratio))
        if hidden > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))
        else:
            self.norm2 = None
            self.mlp = None

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        kw: dict[str, Any] = {"causal": causal}
        if mask is not None:
            kw["mask"] = mask
        y = self.mixer(self.norm1(x), **kw)
        x = x + self.drop(y)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class _Trunk(nn.Module):
    def __init__(self, *, mixer: str, dim: int, n_layers: int, max_len: int, vocab_size: int | None,
                 n_features: int | None, mixer_kwargs: dict[str, Any] | None, positional: str, mlp_ratio: float,
                 dropout: float, embed_dropout: float) -> None:
        super().__init__()
        if positional not in POSITIONAL:
            raise ValueError(f"positional: expected one of {POSITIONAL}, got {positional!r}")
        for name, v in (("dim", dim), ("n_layers", n_layers), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        check_mixer(mixer)
        self.dim, self.max_len, self.positional = dim, max_len, positional
        if (vocab_size is None) == (n_features is None):
            raise ValueError("exactly one of vocab_size (token inputs) and n_features (float inputs) is needed")
        self.embed = nn.Embedding(vocab_size, dim) if vocab_size is not None else nn.Linear(n_features, dim)
        if positional == "learned":
            self.pos = nn.Embedding(max_len, dim)
        elif positional == "sinusoidal":
            self.register_buffer("pos_table", _sinusoidal(max_len, dim), persistent=False)
        self.embed_drop = nn.Dropout(embed_dropout)
        mixers = [build_mixer(mixer, dim, **dict(mixer_kwargs or {})) for _ in range(n_layers)]
        self.blocks = nn.ModuleList(Block(dim, m, mlp_ratio=mlp_ratio, dropout=dropout) for m in mixers)
        self.norm = nn.LayerNorm(dim)
        self._init_weights()

    def _init_weights(self) -> None:
        zoology_init(self, len(self.blocks))

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        from attnzoo.parallel import current, positions

        n = inputs.shape[1]
        sharding = current()  # inputs are this process's shard of the sequence: embed the global positions
        total = n * sharding.world_size if sharding is not None else n
        if total > self.max_len:
            raise ValueError(f"inputs: length {total} exceeds the model's max_len={self.max_len}")
        pos = slice(0, n) if sharding is None else positions(total, sharding.layout, rank=sharding.rank,
                                                              world_size=sharding.world_size, device=inputs.device)
        x = self.embed(inputs)
        if self.positional == "learned":
            x = x + self.pos.weight[pos]
        elif self.positional == "sinusoidal":
            x = x + self.pos_table[pos].to(x.dtype)
        x = self.embed_drop(x)
        for b in self.blocks:
            x = b(x, mask=mask, causal=causal)
        return self.norm(x)


class TinyLM(nn.Module):
    """Causal language model: embedding, positions, ``n_layers`` blocks, norm, head.

    ``forward(inputs [B, L], select=None)`` returns logits ``[B, L, n_outputs]``, or
    ``[K, n_outputs]`` at the ``K`` positions where the bool ``select`` ``[B, L]`` is True
    (the loss of a sparsely labelled task needs only those). With ``n_features`` the inputs
    are float vectors ``[B, L, n_features]`` (in-context regression, ``n_outputs=1``). The head
    shares the token embedding (``tie_weights``, as Zoology) when it predicts the input vocabulary.
    """

    causal = True

    def __init__(self, mixer: str, *, vocab_size: int | None = None, n_features: int | None = None, dim: int = 64,
                 n_layers: int = 2, max_len: int = 512, n_outputs: int | None = None,
                 mixer_kwargs: dict[str, Any] | None = None, positional: str = "learned", mlp_ratio: float = 0.0,
                 dropout: float = 0.0, embed_dropout: float = 0.0, tie_weights: bool = True) -> None:
        super().__init__()
        check_mixer(mixer, {"causal"}, what="a causal language model")
        self.trunk = _Trunk(mixer=mixer, dim=dim, n_layers=n_layers, max_len=max_len, vocab_size=vocab_size,
                            n_features=n_features, mixer_kwargs=mixer_kwargs, positional=positional,
                            mlp_ratio=mlp_ratio, dropout=dropout, embed_dropout=embed_dropout)
        out = n_outputs if n_outputs is not None else vocab_size
        if out is None:
            raise ValueError("n_outputs: needed with float inputs")
        self.head = nn.Linear(dim, out, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)
        self.tied = bool(tie_weights and vocab_size is not None and out == vocab_size)
        if self.tied:  # as Zoology: the head shares the token embedding
            self.head.weight = self.trunk.embed.weight

    def forward(self, inputs: torch.Tensor, select: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.trunk(inputs, mask, causal=True)
        if select is not None:
            h = h[select]
        return self.head(h)


class EncoderClassifier(nn.Module):
    """Non-causal encoder with a classification head over a pooled token.

    ``pooling``: ``"cls"`` (the first token, LRA ListOps) or ``"mean"`` (over real tokens).
    ``forward(inputs [B, L], mask=None)`` returns logits ``[B, n_classes]``; ``mask`` marks
    real tokens and is passed to the mixers that declare ``padding`` support.
    """

    causal = False

    def __init__(self, mixer: str, *, vocab_size: int, n_classes: int, dim: int = 64, n_layers: int = 2,
                 max_len: int = 512, mixer_kwargs: dict[str, Any] | None = None, positional: str = "learned",
                 mlp_ratio: float = 2.0, dropout: float = 0.0, embed_dropout: float = 0.0,
                 pooling: str = "cls") -> None:
        super().__init__()
        spec = check_mixer(mixer, {"self"}, what="an encoder")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling: expected one of ('cls', 'mean'), got {pooling!r}")
        self.pooling = pooling
        self.use_mask = "padding" in spec.supports
        self.trunk = _Trunk(mixer=mixer, dim=dim, n_layers=n_layers, max_len=max_len, vocab_size=vocab_size,
                            n_features=None, mixer_kwargs=mixer_kwargs, positional=positional, mlp_ratio=mlp_ratio,
                            dropout=dropout, embed_dropout=embed_dropout)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        h = self.trunk(inputs, mask if self.use_mask else None, causal=False)
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            w = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device) if mask is None else mask.to(h.dtype)
            pooled = (h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled)


def model_defaults(task: Task) -> dict[str, Any]:
    """What ``positional=None`` and ``mlp_ratio=None`` mean in :func:`build_model` for ``task``: learned
    positions and no MLP in a language model (as Zoology), an MLP of ratio 2 in the other sequence models;
    no positions and no MLP blocks in a bag classifier (its instances are a set)."""
    if task.kind == "bag":
        return {"positional": "none", "mlp_ratio": None}
    return {"positional": "learned", "mlp_ratio": 0.0 if task.kind == "lm" else 2.0}


def build_model(task: Task, mixer: str, *, dim: int = 64, n_layers: int = 2,
                mixer_kwargs: dict[str, Any] | None = None, positional: str | None = None,
                mlp_ratio: float | None = None, dropout: float = 0.0, embed_dropout: float = 0.0) -> nn.Module:
    """The model ``task`` needs around ``mixer``: a :class:`TinyLM` for ``lm``/``regress`` tasks,
    an :class:`EncoderClassifier` for ``classify``, a :class:`BagClassifier` around the pooler ``mixer``
    for ``bag`` tasks (``n_layers`` instance-encoder layers, ``mixer_kwargs`` to the pooler). ``None``
    means the task's default (:func:`model_defaults`). Raises ``ValueError`` (before any training) when
    the entry cannot be the task's mechanism, or an option has no meaning for its model."""
    check_entry(mixer, task)
    defaults = model_defaults(task)
    if task.kind == "bag":
        if positional not in (None, "none"):
            raise ValueError(f"positional: the instances of a bag task ({task.label()}) are a set, without "
                             f"positions; expected 'none' (the default), got {positional!r}")
        if mlp_ratio is not None:
            raise ValueError(f"mlp_ratio: the bag classifier of {task.label()} has no MLP blocks (instance encoder, "
                             f"pooler, head); expected None, got {mlp_ratio!r}")
        return BagClassifier(mixer, n_features=task.n_features, n_classes=task.n_outputs, dim=dim,
                             n_layers=n_layers, pooler_kwargs=mixer_kwargs, dropout=dropout,
                             embed_dropout=embed_dropout)
    positional = defaults["positional"] if positional is None else positional
    common = dict(dim=dim, n_layers=n_layers, max_len=task.seq_len, mixer_kwargs=mixer_kwargs,
                  positional=positional, dropout=dropout, embed_dropout=embed_dropout)
    if task.kind == "classify":
        return EncoderClassifier(mixer, vocab_size=task.vocab_size_in, n_classes=task.n_outputs,
                                 mlp_ratio=2.0 if mlp_ratio is None else mlp_ratio, **common)
    if task.kind == "regress":
        return TinyLM(mixer, n_features=task.n_features, n_outputs=1,
                      mlp_ratio=2.0 if mlp_ratio is None else mlp_ratio, **common)
    return TinyLM(mixer, vocab_size=task.vocab_size_in, n_outputs=task.n_outputs,
                  mlp_ratio=0.0 if mlp_ratio is None else mlp_ratio, **common)


class BagClassifier(nn.Module):
    """Set / bag classifier around any registered pooler: instance encoder -> pooler -> head.

    The instance encoder is ``n_layers`` linear layers of width ``dim`` with ReLU between them (dropout
    ``dropout`` after each ReLU, ``embed_dropout`` on the instance embeddings the pooler sees).
    ``forward(inputs [B, N, F], mask=None, return_weights=False)`` returns logits ``[B, n_classes]``
    (and, with ``return_weights``, the pooler's weights reduced to ``[B, N]`` by a mean over any
    head / branch / query axes). A pooler giving ``[B, K, C]`` is averaged over its K outputs.
    """

    def __init__(self, pooler: str, *, n_features: int, n_classes: int, dim: int = 64, n_layers: int = 2,
                 pooler_kwargs: dict[str, Any] | None = None, dropout: float = 0.0,
                 embed_dropout: float = 0.0) -> None:
        super().__init__()
        check_pooler(pooler, what="a bag classifier")
        for name, v in (("n_features", n_features), ("n_classes", n_classes), ("dim", dim), ("n_layers", n_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        for name, v in (("dropout", dropout), ("embed_dropout", embed_dropout)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {v!r}")
        layers: list[nn.Module] = [nn.Linear(n_features, dim)]
        for _ in range(n_layers - 1):
            layers += [nn.ReLU(), *([nn.Dropout(dropout)] if dropout else []), nn.Linear(dim, dim)]
        self.encoder = nn.Sequential(*layers)
        self.embed_drop = nn.Dropout(embed_dropout)
        variant = parse_mixer(pooler)
        try:
            self.pooler = attnzoo.create(variant.slug, dim=dim, **merge_kwargs(variant, pooler_kwargs or {}))
        except TypeError as e:
            raise ValueError(f"pooler {pooler!r}: {e}") from None
        with torch.no_grad():
            width = self._pool(torch.zeros(1, 2, dim), None, False)[0].shape[-1]
        self.head = nn.Linear(width, n_classes)

    def _pool(self, h: torch.Tensor, mask: torch.Tensor | None, weights: bool) -> tuple[torch.Tensor, Any]:
        out = self.pooler(h, mask=mask, return_weights=True) if weights else self.pooler(h, mask=mask)
        z, w = out if weights else (out, None)
        if z.dim() == 3:
            z = z.mean(1)
        if w is not None and w.dim() > 2:
            w = w.flatten(2).mean(-1)
        return z, w

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        z, w = self._pool(self.embed_drop(self.encoder(inputs)), mask, return_weights)
        logits = self.head(z)
        return (logits, w) if return_weights else logits


class SmallCNN(nn.Module):
    """A small CNN host for the channel modules: two conv stages, each followed by ``channel`` (or nothing),
    global average pooling and a linear head. ``forward(images [B, in_channels, H, W]) -> [B, n_classes]``."""

    def __init__(self, channel: str | None, *, in_channels: int = 3, n_classes: int = 10, width: int = 16,
                 channel_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if channel is not None and attnzoo.spec(channel).type != "channel":
            raise ValueError(f"channel: expected a registered channel module (one of "
                             f"{', '.join(s.slug for s in attnzoo.list(type='channel'))}), got {channel!r}")

        def gate(c: int) -> nn.Module:
            return nn.Identity() if channel is None else attnzoo.create(channel, channels=c, **(channel_kwargs or {}))

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(), gate(width),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * width), nn.ReLU(), gate(2 * width))
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean((2, 3)))


class TinyDiT(nn.Module):
    """A small DiT-style denoiser (the host of the diffusion steering entries), built from registry mixers.

    ``forward(latents [B, H, W, C_in], t [B] (or a number), text [B, L] long, *, text_mask=None)
    -> eps [B, H, W, C_in]``. Latent cells are image tokens (linear patch embedding, learned
    positions, plus a timestep embedding); each of ``n_layers`` pre-norm blocks runs
    self-attention over the image tokens (``self_attention``, any registered mixer, default ``mha``),
    cross-attention from the image tokens to the text tokens (``mha`` with a context) and an MLP.
    Attention layers in module order alternate self, cross: :attr:`self_layers` and
    :attr:`cross_layers` are their indices for steering and capture.
    """

    def __init__(self, grid: tuple[int, int] = (4, 4), in_channels: int = 4, dim: int = 32, n_heads: int = 4,
                 n_layers: int = 2, text_vocab: int = 32, *, self_attention: str = "mha",
                 backend: str = "auto") -> None:
        super().__init__()
        if len(tuple(grid)) != 2 or any(not isinstance(g, int) or g < 1 for g in grid):
            raise ValueError(f"grid: expected (H, W) of positive integers, got {grid!r}")
        self.grid, self.in_channels, self.dim = tuple(grid), in_channels, dim
        n_tok = self.grid[0] * self.grid[1]
        self.patch_in = nn.Linear(in_channels, dim)
        self.pos = nn.Parameter(torch.randn(n_tok, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_embed = nn.Embedding(text_vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(dim),
                           "self_attn": build_mixer(self_attention, dim, n_heads=n_heads, backend=backend),
                           "norm2": nn.LayerNorm(dim),
                           "cross_attn": build_mixer("mha", dim, n_heads=n_heads, backend=backend),
                           "norm3": nn.LayerNorm(dim),
                           "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))})
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, in_channels)
        self.self_layers = [2 * i for i in range(n_layers)]
        self.cross_layers = [2 * i + 1 for i in range(n_layers)]

    def _t_embed(self, t: torch.Tensor, b: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(b) if torch.as_tensor(t).numel() == 1 \
            else torch.as_tensor(t, dtype=torch.float64)
        if t.shape != (b,):
            raise ValueError(f"t: expected one timestep or {b} (one per latent), got {list(t.shape)}")
        half = self.dim // 2
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        ang = t[:, None] * freq[None]
        emb = torch.cat([torch.sin(ang), torch.cos(ang)], -1)
        if emb.shape[-1] < self.dim:
            emb = nn.functional.pad(emb, (0, self.dim - emb.shape[-1]))
        return self.t_mlp(emb.to(dtype=dtype, device=self.pos.device))

    def forward(self, latents: torch.Tensor, t: Any, text: torch.Tensor, *,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        want = (*self.grid, self.in_channels)
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or tuple(latents.shape[1:]) != want:
            got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents: expected [B, {want[0]}, {want[1]}, {want[2]}], got {got}")
        if not isinstance(text, torch.Tensor) or text.dtype != torch.long or text.dim() != 2 or \
                text.shape[0] not in (1, latents.shape[0]):
            got = f"{text.dtype} {list(text.shape)}" if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"text: expected a long tensor [{latents.shape[0]}, L], got {got}")
        b = latents.shape[0]
        text = text.expand(b, -1)
        if text_mask is not None:
            text_mask = text_mask.expand(b, -1)
        h = self.patch_in(latents.reshape(b, -1, self.in_channels)) + self.pos.to(latents.dtype)
        h = h + self._t_embed(t, b, latents.dtype)[:, None]
        ctx = self.text_embed(text)
        for blk in self.blocks:
            h = h + blk["self_attn"](blk["norm1"](h))
            h = h + blk["cross_attn"](blk["norm2"](h), context=ctx, context_mask=text_mask)
            h = h + blk["mlp"](blk["norm3"](h))
        return self.out(self.norm(h)).reshape(latents.shape)


def ddim_sample(model: Any, noise: torch.Tensor, text: torch.Tensor, *, steps: int = 4, n_train_steps: int = 1000,
                **kwargs: Any) -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0) with the linear beta schedule (1e-4 .. 0.02): ``noise`` ``[B, H, W, C]``
    -> latents. ``model(latents, t, text, **kwargs) -> eps`` (a :class:`TinyDiT` or a steering wrapper of it)."""
    if not isinstance(steps, int) or not 1 <= steps <= n_train_steps:
        raise ValueError(f"steps: expected an integer in 1..{n_train_steps}, got {steps!r}")
    betas = torch.linspace(1e-4, 0.02, n_train_steps, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    ts = torch.linspace(n_train_steps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    x = noise
    for i, t in enumerate(ts):
        a_t = abar[t].item()
        a_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        eps = model(x, torch.full((x.shape[0],), float(t)), text, **kwargs)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x
