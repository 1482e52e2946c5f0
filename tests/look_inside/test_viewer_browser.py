"""The HTML viewer in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``).

Driven with Selenium through the system ``/usr/bin/chromedriver`` (the Service path is given, so
Selenium Manager never runs and nothing is downloaded). Checks, on a short page with hostile tokens
and on a 2,000-token page over its size budget: the page loads with no console errors and no alert,
tokens render as text (no extra script or img element), a model-view thumbnail opens its head, the
head view's toggles and token focus, the heatmap's value on hover, zoom (buttons, wheel), the
sortable head table, the token search box, and the query bars. Skips only when chromium or
chromedriver is not installed (``apt-get install chromium chromium-driver``; ``.ci/run`` does it on CI).
"""

import os
import re
import shutil

import pytest
import torch

from attnzoo.inspect import capture
from attnzoo.inspect.capture import Cache
from attnzoo.inspect.viewer import render_html
from attnzoo.layers.lm import TinyLM


def _find(env: str, default: str, name: str) -> str | None:
    path = os.environ.get(env) or (default if os.path.exists(default) else shutil.which(name))
    return path if path and os.access(path, os.X_OK) else None


CHROMIUM = _find("ATTNZOO_CHROMIUM", "/usr/bin/chromium", "chromium")
CHROMEDRIVER = _find("ATTNZOO_CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver "
                                       "(apt-get install chromium chromium-driver)")

SCRIPT_TOKEN = "<script>alert(1)</script>"
IMG_TOKEN = "<img src=x onerror=alert(2)>"
TOKENS = [SCRIPT_TOKEN, IMG_TOKEN, "a&b", "\"q'", "x", "y"]
LONG = 2000
NEEDLE = 1234
_RECORD_ALERTS = """
window.__alerts = [];
for (const f of ['alert', 'confirm', 'prompt']) window[f] = (m) => { window.__alerts.push(f + ':' + m); };
"""


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (attnzoo[dev])")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.set_capability("unhandledPromptBehavior", "ignore")  # a real alert stays open, to be seen below
    d = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    d.set_page_load_timeout(60)
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _RECORD_ALERTS})
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def short_file(tmp_path_factory):
    torch.manual_seed(0)
    lm = TinyLM(vocab=16, dim=16, n_heads=4, n_layers=2)
    c = capture(lm, torch.randint(0, 16, (1, len(TOKENS))), what="weights")
    path = tmp_path_factory.mktemp("viewer") / "view.html"
    path.write_text(render_html(TOKENS, c, importance=torch.rand(2, 4), title="<b>title</b>"), encoding="utf-8")
    return path, c


@pytest.fixture
def page(short_file, driver):
    """The short page, freshly loaded; ``page.cache`` is its capture."""
    driver.get_log("browser")  # drop anything logged before the page
    driver.get(short_file[0].as_uri())
    driver.cache = short_file[1]
    yield driver
    assert _severe(driver) == []
    _no_alert(driver)


def _long_cache() -> Cache:
    """Causal maps: a previous-token head, a sink head (layer 0), a local head and a diffuse one."""
    g = torch.Generator().manual_seed(0)
    c = Cache(2, [0, 1], ["layer0", "layer1"], [2, 2])
    i = torch.arange(LONG)
    for layer in range(2):
        s = torch.randn(2, LONG, LONG, generator=g)
        s[0] += 6 * (i[:, None] - 1 == i[None, :]) if layer else -0.05 * (i[:, None] - i[None, :]).abs()
        s[1, :, 0] += 5 * (1 - layer)
        c.data["weights", layer] = s.masked_fill(i[None, :] > i[:, None], float("-inf")).softmax(-1)[None]
    return c


@pytest.fixture(scope="module")
def long_page(tmp_path_factory, driver):
    c = _long_cache()
    toks = [f"w{i}" for i in range(LONG)]
    toks[NEEDLE] = "needle"
    path = tmp_path_factory.mktemp("viewer") / "long.html"
    path.write_text(render_html(toks, c, max_bytes=10_000_000), encoding="utf-8")
    driver.get_log("browser")
    driver.get(path.as_uri())
    driver.cache = c
    return driver


def _js(d, script):
    return d.execute_script(script)


def _severe(d):
    return [e for e in d.get_log("browser") if e["level"] == "SEVERE"]


def _no_alert(d):
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        d.switch_to.alert  # noqa: B018 - the property raises when no dialog is open
    assert _js(d, "return window.__alerts") == []


def _by(d, css):
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, css)


def _hover_cell(d, which, i, j):
    """Move the mouse over cell (i, j) of a heatmap (``heat`` or ``rollout``); the tooltip's text."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = _by(d, f"#{'map' if which == 'heat' else 'rollout'} canvas.plot")
    _js(d, f"document.querySelector('#{'map' if which == 'heat' else 'rollout'}').scrollIntoView({{block: 'start'}})")
    dx, dy = _js(d, f"""const h = window.attnzooViewer.{which}, r = h.canvas.getBoundingClientRect();
        return [h.LM + ({j} - h.x0 + 0.5) * h.s - r.width / 2, h.TM + ({i} - h.y0 + 0.5) * h.s - r.height / 2];""")
    ActionChains(d).move_to_element_with_offset(canvas, round(dx), round(dy)).perform()
    tip = _by(d, f"#{'map' if which == 'heat' else 'rollout'} .tip")
    assert tip.value_of_css_property("display") == "block"
    assert _js(d, "return document.querySelector('.tip').children.length") == 0  # text only
    return tip.get_attribute("textContent"), tip.get_attribute("data-cell")


def test_loads_without_errors_or_alerts(page):
    assert _js(page, "return document.scripts.length") == 2
    assert _js(page, "return document.querySelectorAll('img, b, iframe').length") == 0
    assert page.title == "<b>title</b>"
    assert _js(page, "return document.querySelector('h1').textContent") == "<b>title</b>"


def test_tokens_render_as_text(page):
    assert _js(page, "return [...document.querySelectorAll('#tokens span')].map(e => e.textContent)") == TOKENS
    q = _js(page, "return [...document.querySelectorAll('#head-view .tok.q')].map(e => e.title)")
    k = _js(page, "return [...document.querySelectorAll('#head-view .tok.k')].map(e => e.title)")
    assert q == k == [f"{i}: {t}" for i, t in enumerate(TOKENS)]
    opts = _js(page, "return [...document.querySelectorAll('#query option')].map(e => e.textContent)")
    assert opts[2:] == ["2: a&b", "3: \"q'", "4: x", "5: y"] and opts[0].startswith("0: <script>")
    text, _ = _hover_cell(page, "heat", 1, 0)
    assert f"\u201c{IMG_TOKEN}\u201d" in text and f"\u201c{SCRIPT_TOKEN}\u201d" in text


def test_model_view_thumbnail_opens_its_head(page):
    thumbs = _js(page, "return [...document.querySelectorAll('#model-view canvas')].map(c => c.title)")
    assert thumbs == [f"layer {li} head {h}" for li in (0, 1) for h in range(4)]
    assert _by(page, "#current").text == "layer 1, head 0"  # the last layer, as the PNG
    before = _js(page, "return document.querySelector('#map canvas.plot').toDataURL()")
    _by(page, '#model-view canvas[data-l="0"][data-h="2"]').click()
    assert _by(page, "#current").text == "layer 0, head 2"
    assert _js(page, "return document.querySelector('#model-view canvas.cur').title") == "layer 0 head 2"
    assert _js(page, "return [document.getElementById('layer').value, document.getElementById('head').value]") == \
        ["0", "2"]
    assert _js(page, "return document.querySelector('#map canvas.plot').toDataURL()") != before
    assert _js(page, "return document.querySelector('#summary tr.cur').dataset.h") == "2"


def _lines(d):
    return _js(d, "const c = document.getElementById('lines'); return [+c.dataset.lines, c.dataset.heads]")


def test_head_view_toggles_and_token_focus(page):
    from selenium.webdriver.common.action_chains import ActionChains

    n_all, heads = _lines(page)
    assert heads == "0,1,2,3" and n_all > 0
    assert len(_js(page, "return document.querySelectorAll('#head-toggles input')")) == 4
    _by(page, '#head-toggles input[data-h="0"]').click()
    n_three, heads = _lines(page)
    assert heads == "1,2,3" and 0 < n_three < n_all
    _by(page, "#heads-none").click()
    assert _lines(page) == [0, ""]
    _by(page, "#heads-all").click()
    assert _lines(page) == [n_all, "0,1,2,3"]
    ActionChains(page).double_click(_by(page, '#head-toggles input[data-h="2"]').find_element("xpath", "..")).perform()
    assert _lines(page)[1] == "2"
    _by(page, "#heads-all").click()
    q3 = _by(page, '#head-view .tok.q[data-i="3"]')
    ActionChains(page).move_to_element(q3).perform()
    n_q3 = _lines(page)[0]
    assert 0 < n_q3 <= 4 * 4  # causal: query 3 sees keys 0..3, in each of 4 heads
    q3.click()  # pins
    ActionChains(page).move_to_element(_by(page, "h1")).perform()
    assert _lines(page)[0] == n_q3 and "pin" in q3.get_attribute("class")
    assert _js(page, "return document.getElementById('query').value") == "3"  # pinning a query selects it
    q3.click()  # unpins
    ActionChains(page).move_to_element(_by(page, "h1")).perform()
    assert _lines(page)[0] == n_all


def test_heatmap_hover_shows_the_value(page):
    text, cell = _hover_cell(page, "heat", 4, 2)
    assert cell == "4,2"
    w = page.cache["weights", 1][0, 0]  # layer 1 head 0 opens first
    assert "query 4 \u201cx\u201d" in text and "key 2 \u201ca&b\u201d" in text
    assert float(re.search(r"weight (\d\.\d{4})", text).group(1)) == pytest.approx(float(w[4, 2]), abs=6e-5)
    colour_bar = _js(page, "return document.querySelector('#map canvas.cbar').title")
    assert colour_bar.startswith("colour scale (sqrt): 0 to")


def test_zoom_pan_and_click(page):
    from selenium.webdriver.common.action_chains import ActionChains

    scale = lambda: float(_by(page, "#map").get_attribute("data-scale"))  # noqa: E731
    fit = scale()
    _by(page, "#map .bar button[title='zoom in']").click()
    assert scale() == pytest.approx(2 * fit, rel=1e-3)
    _js(page, """const c = document.querySelector('#map canvas.plot'), r = c.getBoundingClientRect();
        c.dispatchEvent(new WheelEvent('wheel', {deltaY: -100, clientX: r.left + 200, clientY: r.top + 200,
                                                  bubbles: true, cancelable: true}));""")
    assert scale() == pytest.approx(2.5 * fit, rel=1e-3)
    assert float(_by(page, "#map").get_attribute("data-x0")) > 0  # zoomed about the mouse, not the corner
    x0, y0 = (float(_by(page, "#map").get_attribute(a)) for a in ("data-x0", "data-y0"))
    canvas = _by(page, "#map canvas.plot")
    ActionChains(page).click_and_hold(canvas).move_by_offset(60, 40).release().perform()  # drag to pan
    x1, y1 = (float(_by(page, "#map").get_attribute(a)) for a in ("data-x0", "data-y0"))
    assert x1 < x0 and y1 < y0 and _js(page, "return document.getElementById('query').value") == "5"
    _hover_cell(page, "heat", 1, 1)
    ActionChains(page).click().perform()  # a click without a drag selects that row's query
    assert _js(page, "return document.getElementById('query').value") == "1"
    _by(page, "#map .bar button[title='show the whole map']").click()
    assert scale() == pytest.approx(fit, rel=1e-3)
    _by(page, "#map .bar button[title='zoom out']").click()
    assert scale() == pytest.approx(fit, rel=1e-3)  # never smaller than the whole map


def test_head_table_sorts(page):
    def column(c):
        return _js(page, "return [...document.querySelectorAll('#summary tbody tr')]"
                         f".map(r => +r.cells[{c}].dataset.v)")

    assert len(column(0)) == 8
    _by(page, '#summary th[data-col="2"]').click()  # sink, largest first
    sink = column(2)
    assert sink == sorted(sink, reverse=True)
    assert "desc" in _by(page, '#summary th[data-col="2"]').get_attribute("class")
    _by(page, '#summary th[data-col="2"]').click()
    assert column(2) == sorted(sink)
    for c in (3, 4, 5):  # entropy, distance, importance
        _by(page, f'#summary th[data-col="{c}"]').click()
        assert column(c) == sorted(column(c), reverse=True)
    row = _by(page, "#summary tbody tr")
    layer, head = row.get_attribute("data-l"), row.get_attribute("data-h")
    row.click()
    assert _js(page, "return [document.getElementById('layer').value, document.getElementById('head').value]") == \
        [layer, head]


def test_search_box_selects_and_zooms(page):
    from selenium.webdriver.common.keys import Keys

    box = _by(page, "#search")
    box.send_keys("A&B")
    assert _by(page, "#search-count").text == "1 match"
    assert _js(page, "return [...document.querySelectorAll('#tokens span.match')].map(e => e.textContent)") == ["a&b"]
    box.send_keys(Keys.ENTER)
    assert _by(page, "#search-count").text == "1 of 1"
    assert _js(page, "return document.getElementById('query').value") == "2"
    assert _js(page, "return document.querySelector('#tokens span.sel').textContent") == "a&b"
    assert float(_by(page, "#map").get_attribute("data-scale")) >= 14
    assert "query 2 \u201ca&b\u201d" in _by(page, "#query-bars h3").text
    box.clear()
    box.send_keys("#5", Keys.ENTER)
    assert _js(page, "return document.getElementById('query').value") == "5"
    box.clear()
    box.send_keys("zzz")
    assert _by(page, "#search-count").text == "0 matches"


def test_query_bars_follow_the_query(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    bars = ("return [...document.querySelectorAll('#query-bars > div')]"
            ".map(d => [...d.querySelectorAll('.v')].map(e => e.textContent))")
    head, rollout = _js(page, bars)
    assert len(head) == len(rollout) == len(TOKENS)  # a short input: every key, in order
    Select(_by(page, "#query")).select_by_value("0")
    head, rollout = _js(page, bars)
    assert head[0] == rollout[0] == "1.000"  # causal: token 0 attends only to itself
    _by(page, "#tokens span:nth-child(5)").click()  # a token of the text selects it
    assert _js(page, "return document.getElementById('query').value") == "4"
    from selenium.webdriver.common.keys import Keys

    _by(page, "h1").click()
    ActionChains(page).send_keys(Keys.ARROW_DOWN).perform()  # the next query
    assert _js(page, "return document.getElementById('query').value") == "5"


def test_long_input(long_page):
    d = long_page
    assert _severe(d) == []
    _no_alert(d)
    notes = _js(d, "return [...document.querySelectorAll('p.note')].map(p => p.textContent).join(' ')")
    assert f"{LONG} tokens: over the 10 MB budget" in notes and "layer 1 head 0 is embedded at full resolution" in notes
    assert f"up to 160 tokens; this input has {LONG}" in _by(d, "#head-view-note").text
    assert _js(d, "return document.querySelectorAll('#head-view #tokens span').length") == LONG  # the text instead
    assert _by(d, "#map-note").text == ""
    _by(d, "#search").send_keys("needle\n")
    assert _js(d, "return document.getElementById('query').value") == str(NEEDLE)
    s, y0 = (float(_by(d, "#map").get_attribute(a)) for a in ("data-scale", "data-y0"))
    assert s >= 14 and y0 < NEEDLE < y0 + 1000 / s
    text, cell = _hover_cell(d, "heat", NEEDLE, NEEDLE - 1)
    true = float(d.cache["weights", 1][0, 0, NEEDLE, NEEDLE - 1])
    assert cell == f"{NEEDLE},{NEEDLE - 1}" and "\u201cneedle\u201d" in text
    assert float(re.search(r"weight (\d\.\d{4})", text).group(1)) == pytest.approx(true, abs=0.01)  # 8-bit
    assert _js(d, "return document.querySelectorAll('#query-bars .qb').length") == 40  # top 20 of each
    _by(d, '#model-view canvas[data-l="0"][data-h="1"]').click()
    assert "blocks of" in _by(d, "#map-note").text
    text, _ = _hover_cell(d, "heat", NEEDLE, NEEDLE - 1)  # the view kept its place
    assert "max weight" in text and "block" in text
    assert _severe(d) == []


def test_cross_attention_page_without_rollout(tmp_path, driver):
    """Maps of 5 queries over 7 keys (keys are not the tokens): no rollout, keys labelled by position."""
    c = Cache(1, [0], ["layer0"], [2])
    c.data["weights", 0] = torch.randn(1, 2, 5, 7, generator=torch.Generator().manual_seed(0)).softmax(-1)
    path = tmp_path / "cross.html"
    path.write_text(render_html(list("abcde"), c), encoding="utf-8")
    driver.get_log("browser")
    driver.get(path.as_uri())
    assert _js(driver, "return document.getElementById('rollout')") is None
    keys = _js(driver, "return [...document.querySelectorAll('#head-view .tok.k')].map(e => e.textContent)")
    assert keys == [f"#{j}" for j in range(7)]
    text, _ = _hover_cell(driver, "heat", 4, 6)
    assert "key 6 \u201c#6\u201d" in text
    assert float(re.search(r"weight (\d\.\d{4})", text).group(1)) == pytest.approx(float(c["weights", 0][0, 0, 4, 6]),
                                                                                  abs=6e-5)
    assert len(_js(driver, "return document.querySelectorAll('#query-bars .qb')")) == 7
    assert _severe(driver) == []
