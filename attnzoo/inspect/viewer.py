"""Self-contained HTML view of captured attention: per-layer/per-head heatmaps and a head summary table.

``html = render_html(tokens, cache)``; every token string is HTML-escaped in the static table and
JSON-encoded with ``<``, ``>`` and ``&`` escaped inside the page's script, so a token such as
``<script>`` renders as text. No external resources are loaded.
"""

from __future__ import annotations

import html
import json
from typing import Any

import torch

from attnzoo.inspect.capture import Cache, head_summaries

__all__ = ["render_html", "safe_json"]


def safe_json(obj: Any) -> str:
    """JSON safe to embed in a ``<script>`` element."""
    return json.dumps(obj).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


_JS = """
const D = JSON.parse(document.getElementById('attnzoo-data').textContent);
const sel = (id) => document.getElementById(id);
function draw() {
  const l = +sel('layer').value, h = +sel('head').value, w = D.weights[l][h], n = D.tokens.length;
  const t = sel('map'); t.textContent = '';
  const head = t.insertRow(); head.insertCell();
  D.tokens.forEach(k => { const c = head.insertCell(); c.textContent = k; c.className = 'k'; });
  w.forEach((row, i) => { const r = t.insertRow(); const c0 = r.insertCell(); c0.textContent = D.tokens[i];
    row.forEach(v => { const c = r.insertCell(); c.style.background = `rgba(31,119,180,${v})`;
      c.title = v.toFixed(3); }); });
  sel('current').textContent = `layer ${l}, head ${h}`;
}
D.weights.forEach((_, i) => sel('layer').add(new Option(`layer ${i}`, i)));
D.weights[0].forEach((_, i) => sel('head').add(new Option(`head ${i}`, i)));
sel('layer').onchange = draw; sel('head').onchange = draw; draw();
"""


def render_html(tokens: list[str], cache: Cache, *, batch_index: int = 0, title: str = "attnzoo inspect") -> str:
    """A standalone HTML page for one sequence of ``cache`` (which needs ``weights``)."""
    ws = cache.weights()
    if not ws:
        raise ValueError("render_html: the cache has no attention weights (capture with what=('weights', ...))")
    maps = [[[[round(float(v), 4) for v in row] for row in w[batch_index, h]] for h in range(w.shape[1])]
            for w in ws]
    rows = []
    for li, w in zip(sorted(li for n, li in cache.keys() if n == "weights"), ws):
        s = head_summaries(w[batch_index:batch_index + 1])
        for h in range(w.shape[1]):
            rows.append(f"<tr><td>{li}</td><td>{h}</td>" + "".join(
                f"<td>{float(s[k][0, h]):.3f}</td>" for k in ("sink", "entropy", "distance")) + "</tr>")
    toks = "".join(f"<li>{html.escape(str(t))}</li>" for t in tokens)
    data = safe_json({"tokens": [str(t) for t in tokens], "weights": maps})
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} td{{padding:2px 4px;font-size:12px}} .k{{writing-mode:vertical-rl}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p><select id="layer"></select> <select id="head"></select> <span id="current"></span></p>
<table id="map"></table>
<h2>Tokens</h2><ol id="tokens">{toks}</ol>
<h2>Heads</h2><table id="summary"><tr><th>layer</th><th>head</th><th>sink</th><th>entropy</th><th>distance</th></tr>
{''.join(rows)}</table>
<script type="application/json" id="attnzoo-data">{data}</script>
<script>{_JS}</script>
</body></html>
"""


def inspect_model(model_or_path: str, text: str) -> tuple[list[str], Cache]:
    """Tokens and capture for the CLI: ``"minilm"`` (the packaged MiniLM-L6) or a local HF folder."""
    from attnzoo.inspect.capture import capture
    from attnzoo.inspect.hf import load_minilm, load_pretrained

    model, tok = load_minilm() if model_or_path == "minilm" else load_pretrained(model_or_path)
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        cache = capture(model, enc, what=("weights",))
    return tok.convert_ids_to_tokens(enc["input_ids"][0]), cache


def add_cli(sub: Any) -> None:
    """Add ``attnzoo inspect MODEL_OR_PATH --text ... --html out.html`` to the CLI's subparsers."""
    p = sub.add_parser("inspect", help="capture a model's attention on a text and write an HTML view")
    p.add_argument("model", help="'minilm' (the packaged MiniLM-L6) or a local Hugging Face model folder")
    p.add_argument("--text", required=True, help="the text to run")
    p.add_argument("--html", required=True, help="output HTML file")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: Any) -> int:
    tokens, cache = inspect_model(args.model, args.text)
    with open(args.html, "w", encoding="utf-8") as f:
        f.write(render_html(tokens, cache, title=f"attnzoo inspect: {args.model}"))
    print(f"wrote {args.html} ({cache.n_layers} layers)")
    return 0
