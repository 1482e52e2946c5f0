"""The HTML viewer: self-contained, and token text is escaped (a plain-Python HTML parse)."""

from html.parser import HTMLParser

import torch

from attnzoo.inspect import capture
from attnzoo.inspect.viewer import render_html
from attnzoo.layers.lm import TinyLM


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.srcs = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


def test_html_escapes_tokens():
    torch.manual_seed(0)
    lm = TinyLM(vocab=16, dim=16, n_heads=2, n_layers=2)
    toks = ["<script>alert(1)</script>", "a&b", "x", "y"]
    c = capture(lm, torch.randint(0, 16, (1, 4)), what="weights")
    page = render_html(toks, c)
    p = _Collect()
    p.feed(page)
    assert p.tags.count("script") == 2  # the data block and the viewer code, nothing from the tokens
    assert "<script>alert(1)</script>" in "".join(p.text)  # rendered as text
    assert "alert(1)</script>" not in page.split('id="attnzoo-data">')[1].split("</script>")[0]
    assert not p.srcs  # self-contained
