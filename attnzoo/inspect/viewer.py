"""Self-contained HTML view of captured attention, and a static PNG figure.

``html = render_html(tokens, cache, importance=None)`` gives one page with

- a model view: every captured layer x head as a thumbnail (click one to open that head);
- a head view (as bertviz's): every head of one layer at once, one colour per head, with a toggle
  per head; queries on the left, keys on the right, line opacity = weight; hover a token to see
  only its lines, click to pin;
- a canvas heatmap of the open head with a colour bar, the value under the mouse, zoom (wheel,
  buttons) and drag to pan, and token labels once the cells are large enough;
- the attention rollout (Abnar & Zuidema) of the captured layers, as the same zoomable heatmap
  and as bars for the selected query;
- a token strip shaded by the selected query's attention, with a search box (substring or
  ``#position``) that selects and zooms to a token;
- a head table (sink, entropy, distance, and importance when given) sortable by any column.

Long inputs: the maps are embedded quantised (``sqrt``-spaced, 16 bits when everything fits the
size budget ``max_bytes``, else 8 bits) and, over the budget, downsampled (block maximum) with
priority to the head shown first, then the rollout, then the rest of its layer; the page says
which maps are downsampled and by how much, so 2,000+ tokens stay a page of ``max_bytes``.

Text safety: the page's script puts token strings in the DOM with ``textContent`` (or draws them on
a canvas) only, the static parts are HTML-escaped, and the data block is JSON with ``<``, ``>``
and ``&`` escaped, so a token such as ``<script>`` renders as text. No external resources.

``render_png(tokens, cache, path, layer=...)`` writes a static matplotlib figure (every head of one
layer and the rollout, with colour bars); matplotlib is the optional ``attnzoo[report]`` extra.
The HTML page and the PNG open on the same layer by default: the last captured one.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from attnzoo.inspect._viewer_png import check_matplotlib, render_png
from attnzoo.inspect.capture import Cache, head_summaries

__all__ = ["Inspection", "inspect_model", "render_html", "render_png", "safe_json"]

_SUMMARY_COLUMNS = ("sink", "entropy", "distance")
MIN_SIDE = 32  # a downsampled map keeps at least this many cells a side (the model view's thumbnails)


def safe_json(obj: Any) -> str:
    """JSON safe to embed in a ``<script>`` element."""
    return json.dumps(obj).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _captured(cache: Cache, batch_index: int) -> tuple[list[int], list[torch.Tensor]]:
    layers = sorted(li for n, li in cache.keys() if n == "weights")
    if not layers:
        raise ValueError("viewer: the cache has no attention weights (capture with what=('weights', ...))")
    ws = [cache["weights", li].detach().float().cpu() for li in layers]
    b = ws[0].shape[0]
    if not -b <= batch_index < b:
        raise IndexError(f"batch_index: {batch_index} is out of range for a batch of {b}")
    return layers, [w[batch_index] for w in ws]  # each [H, N, M]


def default_layer(layers: list[int]) -> int:
    """The layer :func:`render_html` opens on and :func:`render_png` draws by default: the last captured."""
    return layers[-1]


def _layer_id(who: str, layer: int, layers: list[int], n_layers: int) -> int:
    """A captured model layer index (negative counts from the end)."""
    li = layer + n_layers if -n_layers <= layer < 0 else layer
    if li not in layers:
        raise ValueError(f"{who}: layer {layer} was not captured; captured layers: {layers}")
    return li


def _rollout(layers: list[int], ws: list[torch.Tensor], n_layers: int) -> tuple[torch.Tensor | None, str]:
    """Rollout ``[N, N]`` of one sequence's maps, or None and why not."""
    from attnzoo.inspect.metrics.rollout import attention_rollout

    if any(w.shape[-1] != w.shape[-2] for w in ws) or len({w.shape[-1] for w in ws}) != 1:
        return None, "rollout omitted: it needs square self-attention maps of one size in every layer"
    r = attention_rollout([w.unsqueeze(0) for w in ws])[0].float()
    if len(layers) == n_layers:
        return r, f"rollout over all {n_layers} layers (mean over heads, Â = rownorm(0.5A + 0.5I))"
    return r, f"rollout over the captured layers {layers} only, of the model's {n_layers}"


def _importance_rows(importance: torch.Tensor | None, layers: list[int], ws: list[torch.Tensor],
                     n_layers: int) -> list[list[float]] | None:
    """Importance per captured layer (``[L, H]`` indexed by model layer, or by captured position)."""
    if importance is None:
        return None
    imp = torch.as_tensor(importance).detach().double().cpu()
    if imp.dim() != 2:
        raise ValueError(f"importance: expected [L, H], got shape {list(imp.shape)}")
    if imp.shape[0] == n_layers:
        rows = [imp[li] for li in layers]
    elif imp.shape[0] == len(layers):
        rows = list(imp)
    else:
        raise ValueError(f"importance: expected {n_layers} (model) or {len(layers)} (captured) layers, "
                         f"got shape {list(imp.shape)}")
    for li, w, row in zip(layers, ws, rows):
        if row.shape[0] != w.shape[0]:
            raise ValueError(f"importance: layer {li} has {w.shape[0]} heads, importance gives {row.shape[0]}")
    return [[float(v) for v in row] for row in rows]


# ---- size budget: which maps are embedded at which resolution ----

def _cells(f: int, n: int, m: int) -> int:
    return math.ceil(n / f) * math.ceil(m / f)


def _fit(count: int, n: int, m: int, allowance: float) -> int:
    """The smallest block size ``f`` with ``count`` maps of ``[n, m]`` in ``allowance`` cells (at most
    the block that keeps ``MIN_SIDE`` cells a side)."""
    f_max = max(1, math.ceil(max(n, m) / MIN_SIDE))
    f = 1
    while f < f_max and count * _cells(f, n, m) > allowance:
        f += 1
    return f


@dataclass
class _Plan:
    """Bits per value and block size per map (``blocks[p][h]``, ``rollout``); ``note`` says so."""

    bits: int
    blocks: list[list[int]]
    rollout: int
    note: str


def _plan(shapes: list[tuple[int, int, int]], focus: tuple[int, int], layers: list[int], has_rollout: bool,
          max_bytes: int) -> _Plan:
    """How to embed maps of ``shapes`` (``[H, N, M]`` per captured layer) in ``max_bytes``: 16-bit if
    everything fits, else 8-bit; over the budget, the ``focus`` head (captured position, head) takes
    up to half, the rollout a quarter of the rest, the focus layer's other heads half of what is
    left and the other layers the remainder, each group at the smallest block size that fits."""
    n = shapes[0][1]
    full = sum(h * q * k for h, q, k in shapes) + (n * n if has_rollout else 0)
    if 2 * full <= max_bytes:
        return _Plan(16, [[1] * s[0] for s in shapes], 1, "every map is embedded at full resolution "
                     f"(16-bit, {2 * full / 1e6:.2f} MB of the {max_bytes / 1e6:g} MB budget)")
    if full <= max_bytes:
        return _Plan(8, [[1] * s[0] for s in shapes], 1, "every map is embedded at full resolution "
                     f"(8-bit sqrt-spaced values, {full / 1e6:.2f} MB of the {max_bytes / 1e6:g} MB budget)")
    pos, head = focus
    h0, n0, m0 = shapes[pos]
    blocks = [[0] * s[0] for s in shapes]
    used = 0

    def take(f: int, count: int, q: int, k: int) -> int:
        nonlocal used
        used += count * _cells(f, q, k)
        return f

    blocks[pos][head] = take(_fit(1, n0, m0, max_bytes / 2), 1, n0, m0)
    ro = take(_fit(1, n, n, (max_bytes - used) / 4), 1, n, n) if has_rollout else 1
    f_rest = _fit(h0 - 1, n0, m0, (max_bytes - used) / 2) if h0 > 1 else 1
    for h in range(h0):
        if h != head:
            blocks[pos][h] = take(f_rest, 1, n0, m0)
    others = [p for p in range(len(shapes)) if p != pos]
    count = sum(shapes[p][0] for p in others)
    f_other = max((_fit(count, s[1], s[2], max_bytes - used) for s in shapes), default=1) if count else 1
    for p in others:
        blocks[p] = [take(f_other, 1, shapes[p][1], shapes[p][2]) for _ in range(shapes[p][0])]

    def say(f: int) -> str:
        return "at full resolution" if f == 1 else f"in blocks of {f}x{f} tokens (the block's maximum)"

    parts = [f"{n} tokens: over the {max_bytes / 1e6:g} MB budget for full maps, so values are 8-bit "
             f"(sqrt-spaced) and layer {layers[pos]} head {head} is embedded {say(blocks[pos][head])}"]
    if has_rollout:
        parts.append(f"the rollout {say(ro)}")
    if h0 > 1:
        parts.append(f"the other heads of layer {layers[pos]} {say(f_rest)}")
    if others:
        parts.append(f"the other layers {say(f_other)}")
    return _Plan(8, blocks, ro, "; ".join(parts) + f" ({used / 1e6:.2f} MB). For another head at full "
                 "resolution, render again with layer= and head= (attnzoo inspect --layer L --head H).")


def _encode(m: torch.Tensor, f: int, bits: int) -> dict[str, Any]:
    """One ``[N, M]`` map, block-maximum pooled by ``f`` and quantised as ``q = round(Q·sqrt(w / max))``
    (a non-finite weight is drawn as 0: the page's JSON has no NaN)."""
    m = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    if f > 1:
        m = torch.nn.functional.max_pool2d(m[None, None], f, f, ceil_mode=True)[0, 0]
    vmax = float(m.max())
    top = (1 << bits) - 1
    q = torch.round(torch.sqrt(m.clamp_min(0) / vmax) * top) if vmax > 0 else torch.zeros_like(m)
    raw = q.to(torch.int32).numpy().astype("<u2" if bits == 16 else "u1").tobytes()
    return {"f": f, "r": m.shape[0], "c": m.shape[1], "vmax": vmax, "b64": base64.b64encode(raw).decode("ascii")}


def _asset(name: str) -> str:
    return resources.files("attnzoo.inspect").joinpath("viewer_assets", name).read_text(encoding="utf-8")


def _summary_table(layers: list[int], ws: list[torch.Tensor], imp: list[list[float]] | None,
                   importance_label: str) -> str:
    rows: list[tuple[int, int, list[float]]] = []
    for p, w in enumerate(ws):
        s = head_summaries(w.unsqueeze(0))
        for h in range(w.shape[0]):
            vals = [float(s[k][0, h]) for k in _SUMMARY_COLUMNS] + ([imp[p][h]] if imp is not None else [])
            rows.append((p, h, vals))
    n_cols = len(_SUMMARY_COLUMNS) + (imp is not None)
    top = [max((abs(r[2][c]) for r in rows), default=0.0) or 1.0 for c in range(n_cols)]
    body = []
    for p, h, vals in rows:
        cells = "".join(f'<td data-v="{v!r}" style="--v:{min(abs(v) / t, 1):.3f}">{v:.{4 if c == 3 else 3}f}</td>'
                        for c, (v, t) in enumerate(zip(vals, top)))
        body.append(f'<tr class="row" data-l="{p}" data-h="{h}"><td data-v="{layers[p]}">{layers[p]}</td>'
                    f'<td data-v="{h}">{h}</td>{cells}</tr>')
    columns = ["layer", "head", *_SUMMARY_COLUMNS] + ([importance_label] if imp is not None else [])
    header = "".join(f'<th data-col="{i}" title="click to sort">{html.escape(c)}</th>' for i, c in enumerate(columns))
    return f'<table id="summary"><thead><tr>{header}</tr></thead><tbody>\n{"".join(body)}</tbody></table>'


def render_html(tokens: list[str], cache: Cache, *, batch_index: int = 0, title: str = "attnzoo inspect",
                importance: torch.Tensor | None = None, importance_label: str = "importance",
                rollout: bool = True, layer: int | None = None, head: int = 0, notes: list[str] | tuple = (),
                min_line: float = 0.01, max_bytes: int = 8_000_000, head_view_tokens: int = 160) -> str:
    """A standalone HTML page for one sequence of ``cache`` (which needs ``weights``).

    ``importance``: optional ``[L, H]`` head scores (rows indexed by model layer, or by captured
    layer when it has one row per captured layer), a column of the head table under
    ``importance_label``. ``rollout``: embed the attention rollout of the captured layers (square
    maps only). ``layer``/``head``: the head opened first (``layer`` a model layer index; default
    the last captured, as :func:`render_png`). ``notes``: lines shown under the title.
    ``min_line``: weights below it get no line in the head view. ``max_bytes``: the budget for
    the embedded maps (see the module docstring; the page is about 4/3 of it at most, plus the
    tokens). ``head_view_tokens``: the head view (one line per pair) is drawn up to this many tokens.
    """
    tokens = [str(t) for t in tokens]
    layers, ws = _captured(cache, batch_index)
    for li, w in zip(layers, ws):
        if w.shape[-2] != len(tokens):
            raise ValueError(f"render_html: layer {li} has {w.shape[-2]} queries but {len(tokens)} tokens were given")
    if max_bytes < 1:
        raise ValueError(f"render_html: max_bytes must be positive, got {max_bytes}")
    imp = _importance_rows(importance, layers, ws, cache.n_layers)
    notes = [str(n) for n in notes]
    ro, ro_note = _rollout(layers, ws, cache.n_layers) if rollout else (None, "")
    if ro_note:
        notes.append(ro_note)
    li0 = default_layer(layers) if layer is None else _layer_id("render_html", layer, layers, cache.n_layers)
    pos = layers.index(li0)
    if not 0 <= head < ws[pos].shape[0]:
        raise ValueError(f"render_html: head {head} is out of range for {ws[pos].shape[0]} heads")
    plan = _plan([tuple(w.shape) for w in ws], (pos, head), layers, ro is not None, max_bytes)
    notes.append(plan.note)
    causal = bool(all(torch.triu(w, 1).abs().max() == 0 for w in ws)) if ws[0].shape[-1] > 1 else False
    data = safe_json({
        "tokens": tokens, "layers": layers, "bits": plan.bits,
        "maps": [[_encode(w[h], plan.blocks[p][h], plan.bits) for h in range(w.shape[0])] for p, w in enumerate(ws)],
        "keys": [w.shape[-1] for w in ws],
        "rollout": _encode(ro, plan.rollout, plan.bits) if ro is not None else None,
        "query": len(tokens) - 1 if causal else 0, "init": {"layer": pos, "head": head},
        "minLine": min_line, "headViewTokens": head_view_tokens})
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    rollout_html = ("""<section class="pair"><div><h2>Attention of the selected query</h2>
<div id="query-bars"></div></div>
<div><h2>Rollout</h2><p class="note">How much each position (row) draws on each input token (column)
through all captured layers.</p><div class="heat" id="rollout"></div></div></section>"""
                    if ro is not None else """<section><h2>Attention of the selected query</h2>
<div id="query-bars"></div></section>""")
    token_html = "".join(f'<span title="#{i}">{html.escape(t)}</span>' for i, t in enumerate(tokens))
    parts = {"TITLE": html.escape(title), "NOTES": note_html, "ROLLOUT": rollout_html, "TOKENS": token_html,
             "SUMMARY": _summary_table(layers, ws, imp, importance_label),
             "CSS": _asset("viewer.css"), "DATA": data, "JS": _asset("viewer.js")}
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda mt: parts[mt.group(1)], _asset("viewer.html"))  # one pass


@dataclass
class Inspection:
    """What :func:`inspect_model` ran: tokens, the capture, optional head importance and notes."""

    tokens: list[str]
    cache: Cache
    importance: torch.Tensor | None = None
    importance_label: str = "importance"
    notes: list[str] = field(default_factory=list)


def _embedding_importance(model: Any, enc: Any) -> tuple[torch.Tensor, str]:
    """Head ablation importance ``[L, H]`` for the sentence embedding (mean-pooled last hidden state).

    The gradient importance (``head_importance``) of a loss with no task, such as 1 - cos to the
    unablated embedding, is zero at the unablated model (a stationary point), so the viewer uses
    ablation instead: 1 - cos(embedding with head h of layer l zeroed, embedding), L·H + 1 forward
    passes on the one sentence.
    """
    from attnzoo.inspect.capture import run_model
    from attnzoo.inspect.metrics.importance import ablation_importance

    mask = enc["attention_mask"].unsqueeze(-1).float() if "attention_mask" in enc else None

    def embed(out: Any) -> torch.Tensor:
        h = out.last_hidden_state
        return h.mean(1) if mask is None else (h * mask).sum(1) / mask.sum(1).clamp_min(1)

    with torch.no_grad():
        ref = embed(run_model(model, enc))
    imp = ablation_importance(model, enc, lambda out: torch.nn.functional.cosine_similarity(embed(out), ref).mean())
    return imp, "importance (ablation)"


def inspect_model(model_or_path: str, text: str, *, importance: bool = True) -> Inspection:
    """Tokens, capture and (``importance``) head-ablation importance for the CLI: ``"minilm"`` (the
    packaged MiniLM-L6) or a local Hugging Face folder."""
    from attnzoo.inspect.capture import capture
    from attnzoo.inspect.hf import load_minilm, load_pretrained

    model, tok = load_minilm() if model_or_path == "minilm" else load_pretrained(model_or_path)
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        cache = capture(model, enc, what=("weights",))
    out = Inspection(tok.convert_ids_to_tokens(enc["input_ids"][0]), cache)
    if importance:
        try:
            out.importance, out.importance_label = _embedding_importance(model, enc)
            out.notes.append("importance (ablation): 1 - cos(sentence embedding with the head zeroed, "
                             "unablated embedding), mean-pooled last hidden state")
        except (TypeError, AttributeError, KeyError) as e:  # no last_hidden_state, or unequal head counts
            out.notes.append(f"importance omitted: {e}")
    else:
        out.notes.append("importance omitted (--no-importance)")
    return out


def add_cli(sub: Any) -> None:
    """Add ``attnzoo inspect MODEL_OR_PATH --text ... [--html out.html] [--png out.png]`` to the CLI."""
    p = sub.add_parser("inspect", help="capture a model's attention on a text; write an HTML view and/or a PNG")
    p.add_argument("model", help="'minilm' (the packaged MiniLM-L6) or a local Hugging Face model folder")
    p.add_argument("--text", required=True, help="the text to run")
    p.add_argument("--html", help="output HTML file: the interactive viewer (model view, head view, heatmaps, "
                                  "rollout, head table)")
    p.add_argument("--png", help="output PNG file: a static figure of every head of --layer and the rollout "
                                 "(needs attnzoo[report])")
    p.add_argument("--layer", type=int, default=None,
                   help="layer opened first in the HTML and drawn in the PNG (default: the last)")
    p.add_argument("--head", type=int, default=0, help="head opened first in the HTML (default: 0)")
    p.add_argument("--no-importance", action="store_true",
                   help="skip the head importance column (head ablation: L*H+1 extra forward passes)")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: Any) -> int:
    if not args.html and not args.png:
        print("attnzoo inspect: nothing to write; give --html OUT.html and/or --png OUT.png", file=sys.stderr)
        return 2
    if args.png:
        try:
            check_matplotlib()
        except ImportError as e:
            print(f"attnzoo inspect: {e}", file=sys.stderr)
            return 2
    ins = inspect_model(args.model, args.text, importance=not args.no_importance)
    title = f"attnzoo inspect: {args.model}"
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(render_html(ins.tokens, ins.cache, title=title, importance=ins.importance,
                                importance_label=ins.importance_label, notes=ins.notes, layer=args.layer,
                                head=getattr(args, "head", 0)))
        print(f"wrote {args.html} ({ins.cache.n_layers} layers)")
    if args.png:
        render_png(ins.tokens, ins.cache, args.png, layer=args.layer, title=title)
        print(f"wrote {args.png}")
    return 0
