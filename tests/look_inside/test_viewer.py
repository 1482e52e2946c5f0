"""The HTML viewer and the PNG figure: self-contained, token text escaped (a plain-Python HTML parse),
the embedded maps (quantised, decoded back here), the size budget for long inputs, the head table,
the PNG's labels and colour bars, and the ``attnzoo inspect`` CLI (``--html``/``--png``) with the
model loading replaced by a TinyLM capture. The same pages in a real browser: test_viewer_browser.py."""

import base64
import json
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from attnzoo.inspect import capture
from attnzoo.inspect import viewer as V
from attnzoo.inspect.capture import Cache
from attnzoo.inspect.metrics.rollout import attention_rollout
from attnzoo.inspect.viewer import _plan, render_html, render_png
from attnzoo.layers.lm import TinyLM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.srcs, self.ids = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]
        self.ids += [v for k, v in attrs if k == "id"]

    def handle_data(self, data):
        self.text.append(data)


def _tiny(n=4, n_layers=2, n_heads=2):
    torch.manual_seed(0)
    lm = TinyLM(vocab=16, dim=16, n_heads=n_heads, n_layers=n_layers)
    return capture(lm, torch.randint(0, 16, (1, n)), what="weights")


def synthetic_cache(n: int, n_layers: int, n_heads: int, seed: int = 0) -> Cache:
    """Causal maps with a previous-token head, a sink head and a local head (no model needed)."""
    g = torch.Generator().manual_seed(seed)
    c = Cache(n_layers, list(range(n_layers)), [f"layer{i}" for i in range(n_layers)], [n_heads] * n_layers)
    i = torch.arange(n)
    for layer in range(n_layers):
        s = torch.randn(n_heads, n, n, generator=g)
        for h in range(n_heads):
            kind = (h + layer) % 3
            s[h] += 6 * (i[:, None] - 1 == i[None, :]) if kind == 0 else 0
            s[h, :, 0] += 5 if kind == 1 else 0
            s[h] -= 0.3 * (i[:, None] - i[None, :]).abs() if kind == 2 else 0
        c.data["weights", layer] = s.masked_fill(i[None, :] > i[:, None], float("-inf")).softmax(-1)[None]
    return c


def _data(page):
    return json.loads(page.split('id="attnzoo-data">')[1].split("</script>")[0])


def decode(m, bits):
    """An embedded map back to weights ``[rows, cols]`` (block maxima when ``m["f"] > 1``)."""
    q = np.frombuffer(base64.b64decode(m["b64"]), dtype="<u2" if bits == 16 else "u1").astype(np.float64)
    top = 2**bits - 1
    return torch.from_numpy(m["vmax"] * (q / top) ** 2).reshape(m["r"], m["c"])


def _parse(page):
    p = _Collect()
    p.feed(page)
    return p


def test_html_escapes_tokens():
    toks = ["<script>alert(1)</script>", "a&b", "<img src=x onerror=alert(2)>", "{{JS}}"]
    page = render_html(toks, _tiny(), title="<b>t</b>", notes=["<i>note</i>"])
    p = _parse(page)
    assert p.tags.count("script") == 2  # the data block and the viewer code, nothing from the tokens
    assert not {"img", "b", "i"} & set(p.tags)
    text = "".join(p.text)
    assert "<b>t</b>" in text and "<i>note</i>" in text and "<script>alert(1)</script>" in text  # as text
    assert "<span title=\"#2\">&lt;img src=x onerror=alert(2)&gt;</span>" in page  # the token strip
    data_block = page.split('id="attnzoo-data">')[1].split("</script>")[0]
    assert "alert(1)</script>" not in data_block and "<img" not in data_block
    assert _data(page)["tokens"] == toks  # JSON-escaped, decodes back exactly (no template substitution)
    assert not p.srcs  # self-contained
    assert "innerHTML" not in page and "http://" not in page and "https://" not in page
    assert page.count("{{") == 0 or "{{JS}}" in data_block


def test_page_embeds_every_map_and_the_rollout():
    c = _tiny(n=5)
    page = render_html(list("abcde"), c)
    p = _parse(page)
    assert {"model-view", "head-view", "head-toggles", "map", "rollout", "query-bars", "layer", "head", "query",
            "search", "summary", "tokens"} <= set(p.ids)
    d = _data(page)
    assert d["layers"] == [0, 1] and d["bits"] == 16 and d["keys"] == [5, 5]
    assert d["init"] == {"layer": 1, "head": 0}  # the last captured layer, as the PNG
    for layer in (0, 1):
        for h in (0, 1):
            m = d["maps"][layer][h]
            assert m["f"] == 1 and (m["r"], m["c"]) == (5, 5)
            true = c["weights", layer][0, h].double()
            assert torch.allclose(decode(m, 16), true, atol=2e-5 * m["vmax"])
    ro = decode(d["rollout"], 16)
    assert torch.allclose(ro, attention_rollout(c)[0].double(), atol=1e-4)
    assert d["query"] == 4  # causal: the last token's row is shown first
    assert 0 < d["minLine"] < 1 and d["headViewTokens"] >= 100
    assert "rollout over all 2 layers" in page and "every map is embedded at full resolution (16-bit" in page


def test_rollout_off_partial_layers_and_errors():
    page = render_html(list("abcd"), _tiny(), rollout=False)
    assert _data(page)["rollout"] is None and 'id="rollout"' not in page
    torch.manual_seed(0)
    lm = TinyLM(vocab=16, dim=16, n_heads=2, n_layers=3)
    c = capture(lm, torch.randint(0, 16, (1, 4)), what="weights", layers=[0, 1])
    d = _data(render_html(list("abcd"), c, layer=0, head=1))
    assert d["layers"] == [0, 1] and d["init"] == {"layer": 0, "head": 1}
    assert _data(render_html(list("abcd"), c, layer=-2))["init"]["layer"] == 1  # -2 is model layer 1
    assert "captured layers [0, 1] only" in render_html(list("abcd"), c)
    with pytest.raises(ValueError, match="not captured"):
        render_html(list("abcd"), c, layer=2)
    with pytest.raises(ValueError, match="head 2 is out of range"):
        render_html(list("abcd"), c, head=2)
    with pytest.raises(ValueError, match="max_bytes"):
        render_html(list("abcd"), c, max_bytes=0)
    with pytest.raises(ValueError, match="tokens"):
        render_html(list("abc"), c)


def test_plan_keeps_the_budget_with_priorities():
    shapes = [(4, 1000, 1000)] * 3
    small = _plan([(2, 10, 10)], (0, 0), [0], True, 10**6)
    assert small.bits == 16 and small.blocks == [[1, 1]] and small.rollout == 1
    eight = _plan([(2, 10, 10)], (0, 0), [0], True, 500)  # 300 cells: fits at 8 bits only
    assert eight.bits == 8 and eight.blocks == [[1, 1]] and "8-bit" in eight.note
    p = _plan(shapes, (1, 2), [0, 1, 2], True, 3_000_000)
    assert p.bits == 8 and p.blocks[1][2] == 1  # the head opened first: every token
    assert 1 < p.rollout and 1 < p.blocks[1][0] <= p.blocks[0][0]  # then the rollout, its layer, the others
    assert len({f for f in p.blocks[1] if f > 1}) == 1
    assert len({f for row in (p.blocks[0], p.blocks[2]) for f in row}) == 1
    cells = sum(-(-1000 // f) ** 2 for row in p.blocks for f in row) + (-(-1000 // p.rollout)) ** 2
    assert cells <= 3_000_000
    assert "layer 1 head 2 is embedded at full resolution" in p.note and "blocks of" in p.note
    tight = _plan(shapes, (0, 0), [0, 1, 2], False, 1000)  # never below 32 cells a side
    assert max(f for row in tight.blocks for f in row) == -(-1000 // 32)


def test_long_input_page_stays_in_budget():
    n = 600
    c = synthetic_cache(n, 2, 3)
    toks = [f"t{i}" for i in range(n)]
    budget = 800_000
    page = render_html(toks, c, max_bytes=budget, head=1)
    assert len(page.encode()) < budget * 4 / 3 + 60_000  # base64 of the maps, plus tokens and code
    d = _data(page)
    assert d["bits"] == 8 and d["init"] == {"layer": 1, "head": 1}
    focus = d["maps"][1][1]
    assert focus["f"] == 1
    true = c["weights", 1][0, 1].double()
    assert (decode(focus, 8) - true).abs().max() <= 2.1 * focus["vmax"] / 255  # sqrt-spaced 8-bit
    other = d["maps"][0][0]
    f = other["f"]
    assert f > 1 and (other["r"], other["c"]) == (-(-n // f),) * 2
    pooled = torch.nn.functional.max_pool2d(c["weights", 0][0, :1].double(), f, f, ceil_mode=True)[0]
    assert (decode(other, 8) - pooled).abs().max() <= 2.1 * other["vmax"] / 255
    assert f"{n} tokens: over the" in page and "blocks of" in page


def test_non_finite_weights_keep_the_json_valid():
    c = _tiny()
    c.data["weights", 0] = c.data["weights", 0].clone()
    c.data["weights", 0][0, 1, 2, :] = float("nan")
    d = json.loads(render_html(list("abcd"), c, rollout=False).split('id="attnzoo-data">')[1].split("</script>")[0],
                   parse_constant=lambda name: pytest.fail(f"{name} in the page's JSON"))
    assert decode(d["maps"][0][1], 16)[2].tolist() == [0.0] * 4


def _rows(page):
    return page.split("<tbody>")[1].split("</tbody>")[0]


def test_head_table_sort_values_and_importance():
    c = _tiny()
    plain = render_html(list("abcd"), c)
    assert ">importance</th>" not in plain and 'data-col="5"' not in plain
    imp = torch.tensor([[0.1, 0.2], [0.3, 0.45678]])
    page = render_html(list("abcd"), c, importance=imp, importance_label="importance <ablation>")
    assert '<th data-col="5" title="click to sort">importance &lt;ablation&gt;</th>' in page
    row = _rows(page).split('data-l="1" data-h="1">')[1].split("</tr>")[0]
    assert row.startswith('<td data-v="1">1</td><td data-v="1">1</td>') and row.endswith(">0.4568</td>")
    assert 'data-v="0.45677' in row and "--v:1.000" in row  # the largest importance fills its cell's bar
    sink = float(row.split("<td ")[3].split('data-v="')[1].split('"')[0])
    assert sink == pytest.approx(float(c["weights", 1][0, 1, :, 0].mean()))
    with pytest.raises(ValueError, match="importance"):
        render_html(list("abcd"), c, importance=torch.ones(3, 2))
    with pytest.raises(ValueError, match="heads"):
        render_html(list("abcd"), c, importance=torch.ones(2, 3))


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures render_png saves."""
    from matplotlib.figure import Figure

    figs, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), save(self, *a, **k))[1])
    return figs


def test_render_png_labels_colour_bars_and_default_layer(tmp_path, saved_figures):
    pytest.importorskip("matplotlib")
    toks = ["$x", "<script>", "b", "c"]
    out = render_png(toks, _tiny(), tmp_path / "f.png", title="t")
    assert out.read_bytes()[:8] == PNG_MAGIC
    fig = saved_figures[-1]
    assert "layer 1" in fig._suptitle.get_text()  # the last captured layer, as the HTML page opens on
    labels = {ax.get_ylabel() for ax in fig.axes} | {ax.get_xlabel() for ax in fig.axes}
    assert {"query", "key", "attention weight, layer 1 (sqrt scale)", "rollout weight (sqrt scale)"} <= labels
    heads = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    assert len(heads) == 2
    assert [t.get_text() for t in heads[0].get_yticklabels()] == [r"\$x", "<script>", "b", "c"]
    assert all(t.get_fontsize() >= 6 for t in heads[0].get_yticklabels())
    with pytest.raises(ValueError, match="not captured"):
        render_png(list("abcd"), _tiny(), tmp_path / "g.png", layer=5)


def test_render_png_long_input_uses_positions(tmp_path, saved_figures):
    pytest.importorskip("matplotlib")
    n = 700
    render_png([f"t{i}" for i in range(n)], synthetic_cache(n, 1, 2), tmp_path / "f.png", rollout=False)
    ax = next(a for a in saved_figures[-1].axes if a.get_title() == "head 0")
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks[:3] == ["0", "100", "200"] and len(ticks) <= 10 and ax.get_ylabel() == "query position"
    assert ax.get_images()[0].get_array().shape[0] <= 600  # drawn max-pooled


def test_render_png_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"attnzoo\[report\]"):
        render_png(list("abcd"), _tiny(), tmp_path / "f.png")


@pytest.fixture
def fake_model(monkeypatch):
    """``attnzoo inspect`` with the model loading replaced by a TinyLM capture."""
    calls = []

    def fake(model, text, *, importance=True):
        calls.append((model, text, importance))
        return V.Inspection(["<s>", "a", "b", "c"], _tiny(), torch.rand(2, 2) if importance else None,
                            "importance (ablation)", ["a note"])

    monkeypatch.setattr(V, "inspect_model", fake)
    return calls


def test_cli_png_and_html(tmp_path, fake_model):
    pytest.importorskip("matplotlib")
    from attnzoo.cli import main

    png, page = tmp_path / "f.png", tmp_path / "v.html"
    assert main(["inspect", "m", "--text", "hi", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC and not page.exists()
    assert main(["inspect", "m", "--text", "hi", "--html", str(page), "--png", str(png), "--layer", "0",
                 "--head", "1"]) == 0
    text = page.read_text()
    assert ">importance (ablation)</th>" in text and "a note" in text
    assert _data(text)["init"] == {"layer": 0, "head": 1}
    assert main(["inspect", "m", "--text", "hi", "--html", str(page), "--no-importance"]) == 0
    assert "importance (ablation)<" not in page.read_text() and _data(page.read_text())["init"]["layer"] == 1
    assert [c[2] for c in fake_model] == [True, True, False]


def test_cli_needs_html_or_png(tmp_path, fake_model, capsys):
    from attnzoo.cli import main

    assert main(["inspect", "m", "--text", "hi"]) == 2
    assert "--html" in capsys.readouterr().err and not fake_model  # refused before loading the model


def test_cli_png_without_matplotlib(tmp_path, fake_model, capsys, monkeypatch):
    from attnzoo.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["inspect", "m", "--text", "hi", "--png", str(tmp_path / "f.png")]) == 2
    assert "attnzoo[report]" in capsys.readouterr().err and not fake_model
