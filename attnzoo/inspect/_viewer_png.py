"""The viewer's static figure (matplotlib, the optional ``attnzoo[report]`` extra, imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnzoo.inspect.capture import Cache


def check_matplotlib() -> Any:
    """matplotlib's ``Figure`` class, or an ImportError naming the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("render_png (attnzoo inspect --png) needs matplotlib: "
                          "pip install 'attnzoo[report]'") from e
    return Figure


def _label(t: str, width: int = 16) -> str:
    t = t if len(t) <= width else t[:width - 1] + "\u2026"
    return t.replace("$", r"\$")  # no mathtext from token text


def _ticks(n: int, max_labels: int) -> list[int]:
    """Every position when ``n <= max_labels``, else about 8 round positions."""
    if n <= max_labels:
        return list(range(n))
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10**4, 10**5, 10**6) if n / s <= 9)
    return list(range(0, n, step))


def _shrink(w: Any, pixels: int) -> Any:
    """``[..., N, M]`` max-pooled so that no side exceeds ``pixels`` cells (a figure panel has fewer)."""
    import torch

    f = -(-max(w.shape[-2:]) // pixels)
    if f <= 1:
        return w
    return torch.nn.functional.max_pool2d(w.reshape(-1, 1, *w.shape[-2:]), f, f, ceil_mode=True).reshape(
        *w.shape[:-2], -(-w.shape[-2] // f), -(-w.shape[-1] // f))


def render_png(tokens: list[str], cache: Cache, path: str | Path, *, layer: int | None = None, batch_index: int = 0,
               rollout: bool = True, max_labels: int = 40, title: str | None = None, dpi: int = 120) -> Path:
    """Write a static figure: the heatmap of every head of ``layer`` (a model layer index; default
    the last captured, the layer :func:`render_html` opens on) on one sqrt colour scale with its
    colour bar, and the attention rollout of the captured layers with its own. Rows are queries,
    columns keys; every token labelled up to ``max_labels`` tokens, positions beyond that (maps
    over 600 tokens a side are drawn max-pooled). Needs ``attnzoo[report]``."""
    from matplotlib.colors import PowerNorm

    from attnzoo.inspect.viewer import _captured, _layer_id, _rollout, default_layer

    figure_class = check_matplotlib()
    tokens = [str(t) for t in tokens]
    layers, ws = _captured(cache, batch_index)
    li = default_layer(layers) if layer is None else _layer_id("render_png", layer, layers, cache.n_layers)
    w = ws[layers.index(li)]
    n_heads, n, m = w.shape
    if n != len(tokens):
        raise ValueError(f"render_png: layer {li} has {n} queries but {len(tokens)} tokens were given")
    ro, _ = _rollout(layers, ws, cache.n_layers) if rollout else (None, "")
    ncols = min(n_heads, 4)
    nrows = -(-n_heads // ncols)
    extra = 2 if ro is not None else 0
    cell = 3.3 if max(n, m) <= 24 else 3.0
    fig = figure_class(figsize=(cell * (ncols + extra) + 1.6, cell * nrows + 1.0), layout="constrained")
    gs = fig.add_gridspec(nrows, ncols + extra)
    size = 7 if max(n, m) <= 24 else 6
    rows_at, cols_at = _ticks(n, max_labels), _ticks(m, max_labels)
    row_text, col_text = len(rows_at) == n, len(cols_at) == m and m == n
    row_labels = [_label(tokens[i]) if row_text else str(i) for i in rows_at]
    col_labels = [_label(tokens[j]) if col_text else str(j) for j in cols_at]
    extent = (-0.5, m - 0.5, n - 0.5, -0.5)

    def label_axes(ax: Any, left: bool, bottom: bool, fontsize: float) -> None:
        ax.set_yticks(rows_at, row_labels if left else [], fontsize=fontsize)
        ax.set_xticks(cols_at, col_labels if bottom else [], rotation=90 if col_text else 0, fontsize=fontsize)
        if left:
            ax.set_ylabel("query" if row_text else "query position", fontsize=8)
        if bottom:
            ax.set_xlabel("key" if col_text else "key position", fontsize=8)

    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=max(float(w.max()), 1e-12))
    axes, image = [], None
    for h in range(n_heads):
        r, c = divmod(h, ncols)
        ax = fig.add_subplot(gs[r, c])
        image = ax.imshow(_shrink(w[h], 600).numpy(), cmap="viridis", norm=norm, aspect="auto",
                          interpolation="nearest", extent=extent)
        ax.set_title(f"head {h}", fontsize=9)
        label_axes(ax, c == 0, h + ncols >= n_heads, size)
        axes.append(ax)
    bar = fig.colorbar(image, ax=axes, shrink=0.8, pad=0.01)
    bar.set_label(f"attention weight, layer {li} (sqrt scale)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if ro is not None:
        ax = fig.add_subplot(gs[:, ncols:])
        im = ax.imshow(_shrink(ro, 600).numpy(), cmap="viridis", aspect="auto", interpolation="nearest",
                       norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=max(float(ro.max()), 1e-12)),
                       extent=(-0.5, n - 0.5, n - 0.5, -0.5))
        ax.set_title("rollout" + ("" if len(layers) == cache.n_layers else f" (layers {layers})"), fontsize=9)
        label_axes(ax, True, True, size)
        ax.set_ylabel("output " + ("token" if row_text else "position"), fontsize=8)
        ax.set_xlabel("input " + ("token" if row_text else "position"), fontsize=8)
        rbar = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01)
        rbar.set_label("rollout weight (sqrt scale)", fontsize=8)
        rbar.ax.tick_params(labelsize=7)
    fig.suptitle(_label(title or "attention", 200) + f" \u2014 layer {li}", fontsize=11)
    path = Path(path)
    fig.savefig(path, format="png", dpi=dpi)
    return path
