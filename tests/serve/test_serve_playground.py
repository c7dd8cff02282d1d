"""The playground in a real browser: Debian's Chromium driven by Playwright.

Skipped when Playwright or /usr/bin/chromium is missing (``.ci/browser-deps.sh`` installs the
browser; ``pip install playwright`` the driver -- never ``playwright install``).
"""

from __future__ import annotations

import math
import re
import shutil
import threading
from pathlib import Path

import httpx
import pytest
from tests.serve.test_serve_bpe import bpe_checkpoint  # noqa: F401 - a fixture used below

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (run .ci/browser-deps.sh)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


def test_playground_streams_and_stops(browser, make_server, engines, checkpoint, tmp_path):
    # A slowed engine keeps the stream going long enough to watch it and press Stop.
    engine = engines["slow"](checkpoint.model, delay=0.03)
    s = make_server(engine=engine)
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(s.url + "/")

    # model info comes from /v1/models
    info = page.locator("#model-info")
    info.get_by_text("tiny", exact=True).wait_for()
    assert "gpt" in info.inner_text()
    assert page.locator("#generate").is_enabled()
    assert page.locator("#stop").is_disabled()

    page.fill("#prompt", "To be, or not")
    page.fill("#max-tokens", "500")
    page.locator("#temperature").fill("0.6")
    assert page.locator("#temperature-value").inner_text() == "0.60"
    page.fill("#top-k", "20")
    page.fill("#seed", "42")
    page.click("#generate")

    generated = page.locator("#out-text")
    expect(generated).to_have_text(re.compile(r".{5,}", re.S))
    expect(page.locator("#stop")).to_be_enabled()
    first = generated.text_content()
    expect(generated).to_have_text(re.compile(".{" + str(len(first) + 5) + ",}", re.S))
    assert page.locator("#out-prompt").text_content() == "To be, or not"
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    shutil.copy(tmp_path / "playground.png", Path("/tmp") / "tinygpt-playground.png")

    page.click("#stop")
    expect(page.locator("#stop")).to_be_disabled()
    stopped_at = len(generated.text_content())
    assert 5 < stopped_at < 500
    assert "stopped" in page.locator("#stats").inner_text()
    # the server stopped decoding too
    done = threading.Event()
    for _ in range(200):
        if s.scheduler.stats()["active_sequences"] == 0:
            done.set()
            break
        done.wait(0.02)
    assert done.is_set()
    assert len(generated.text_content()) == stopped_at
    assert not checkpoint.tokenizer.unknown_chars(generated.text_content())

    # errors from the API are shown as text
    page.fill("#prompt", "<b>☃</b>")
    page.click("#generate")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "does not know" in error.inner_text()
    assert page.locator("#error b").count() == 0
    page.screenshot(path=str(tmp_path / "playground-error.png"))
    shutil.copy(tmp_path / "playground-error.png", Path("/tmp") / "tinygpt-playground-error.png")
    assert problems == [] or all("400" in p for p in problems), problems
    page.close()


def test_playground_shows_output_as_text_not_html(browser, make_server, checkpoint, tmp_path):
    """Model output is inserted with text nodes: markup in it is never parsed."""
    s = make_server()
    page = browser.new_page()
    page.goto(s.url + "/")
    page.locator("#model-info").get_by_text("tiny", exact=True).wait_for()
    # Feed the stream reader a hostile chunk through the page's own code path.
    page.route("**/v1/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body='data: {"choices": [{"index": 0, "text": "<img src=x onerror=alert(1)><b>hi</b>", '
             '"finish_reason": "length"}]}\n\ndata: [DONE]\n\n'))
    page.click("#generate")
    expect(page.locator("#out-text")).to_have_text("<img src=x onerror=alert(1)><b>hi</b>")
    expect(page.locator("#generate")).to_be_enabled()
    assert page.locator("#output img").count() == 0
    assert page.locator("#output b").count() == 0
    page.close()


def test_playground_behind_api_key(browser, make_server):
    """With --api-key the browser logs in with HTTP Basic (the key as password)."""
    s = make_server(api_key="browser-key")
    context = browser.new_context(http_credentials={"username": "me", "password": "browser-key"})
    page = context.new_page()
    page.goto(s.url + "/")
    page.locator("#model-info").get_by_text("tiny", exact=True).wait_for()
    page.fill("#prompt", "The")
    page.fill("#max-tokens", "12")
    page.click("#generate")
    expect(page.locator("#stats")).to_contain_text("12 chars")
    assert len(page.locator("#out-text").text_content()) == 12
    context.close()

    anonymous = browser.new_context()
    assert anonymous.request.get(s.url + "/").status == 401
    with pytest.raises(sync_api.Error):  # the browser asks for a login; headless, it gives up
        anonymous.new_page().goto(s.url + "/")
    anonymous.close()


def test_look_inside_bars_and_attention_heatmap(browser, make_server, checkpoint, tmp_path):
    """Hover a generated character: its top-5 bars match the API's logprobs; the layer/head
    picker redraws the heatmap; all of it reachable from the keyboard."""
    s = make_server()
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(s.url + "/")
    page.locator("#model-info").get_by_text("tiny", exact=True).wait_for()
    page.fill("#prompt", "To be")
    page.fill("#max-tokens", "11")  # 5 + 11 = the whole context of the test model
    page.locator("#temperature").fill("0.8")
    page.fill("#seed", "42")
    page.click("#generate")
    expect(page.locator("#stats")).to_contain_text("done")
    spans = page.locator("#out-text .ch")
    expect(spans).to_have_count(11)
    text = page.locator("#out-text").text_content()

    # the same request through the API gives the probabilities the bars must show
    request = {"model": "tiny", "prompt": "To be", "max_tokens": 11, "temperature": 0.8,
               "seed": 42, "logprobs": 5}
    api = httpx.post(s.url + "/v1/completions", json=request, timeout=30).json()["choices"][0]
    assert api["text"] == text

    def bars() -> list[tuple[str, str]]:
        items = page.locator("#next-bars li")
        return [(items.nth(i).locator(".bar-label").text_content(),
                 items.nth(i).locator(".bar-value").text_content()) for i in range(items.count())]

    def expected(i: int) -> list[tuple[str, str]]:
        ranked = sorted(api["logprobs"]["top_logprobs"][i].items(), key=lambda kv: -kv[1])
        shown = ranked[:5] + [kv for kv in ranked[5:] if kv[0] == text[i]]
        names = {" ": "␣", "\n": "↵", "\t": "⇥"}
        return [(names.get(ch, ch), f"{100 * math.exp(lp):.1f}%") for ch, lp in shown]

    spans.nth(3).hover()
    expect(page.locator("#next-bars li")).to_have_count(len(expected(3)))
    assert bars() == expected(3)
    assert page.locator("#next-bars li.chosen .bar-label").text_content() == expected(3)[
        [ch for ch, _ in expected(3)].index({" ": "␣", "\n": "↵"}.get(text[3], text[3]))][0]
    assert "Character 4" in page.locator("#next-caption").text_content()

    # keyboard: the selected character is the tab stop; arrows move and update the bars
    spans.nth(3).focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#next-caption")).to_contain_text("Character 5")
    assert page.evaluate("document.activeElement.dataset.i") == "4"
    assert bars() == expected(4)

    # the heatmap: drawn for layer 0 head 0, redrawn for another head
    heatmap = page.locator("#heatmap")
    expect(heatmap).to_have_attribute("data-state", "ready")
    assert page.locator("#head option").count() == checkpoint.model.config.n_head
    assert page.locator("#layer option").count() == checkpoint.model.config.n_layer
    before = page.evaluate("document.getElementById('heatmap').toDataURL()")
    page.select_option("#head", "1")
    expect(heatmap).to_have_attribute("data-head", "1")
    after = page.evaluate("document.getElementById('heatmap').toDataURL()")
    assert after != before
    assert "head 1" in page.locator("#heatmap-caption").text_content()
    page.focus("#head")  # the pickers are keyboard reachable too
    page.keyboard.press("ArrowUp")
    expect(heatmap).to_have_attribute("data-head", "0")
    assert page.evaluate("document.getElementById('heatmap').toDataURL()") == before

    spans.nth(6).hover()
    expect(page.locator("#next-caption")).to_contain_text("Character 7")
    page.screenshot(path=str(tmp_path / "look-inside.png"), full_page=True)
    shutil.copy(tmp_path / "look-inside.png", Path("/tmp") / "tinygpt-look-inside.png")
    assert problems == [], problems
    page.close()


def test_look_inside_a_bpe_model(browser, bpe_checkpoint):  # noqa: F811 - the fixture
    """Characters point at the token they are in (an emoji spelled by three byte tokens); a
    model without attention says so instead of drawing a heatmap."""
    from tests.serve.conftest import ServerThread, _build_app

    tok = bpe_checkpoint.tokenizer
    with ServerThread(_build_app(bpe_checkpoint)) as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.locator("#model-info").get_by_text("tiny", exact=True).wait_for()
        page.fill("#prompt", "x")
        page.fill("#max-tokens", "4")
        page.locator("#temperature").fill("0")
        page.click("#generate")
        expect(page.locator("#stats")).to_contain_text("done")
        expect(page.locator("#out-text")).to_have_text("🎉y")
        spans = page.locator("#out-text .ch")
        expect(spans).to_have_count(2)
        spans.nth(0).hover()
        completing = tok.token_text(tok.encode("🎉y")[2])  # the token that finishes the emoji
        expect(page.locator("#next-caption")).to_contain_text(f"in the token “{completing}”")
        assert page.locator("#next-bars li.chosen .bar-label").text_content() == completing
        spans.nth(1).hover()
        expect(page.locator("#next-bars li.chosen .bar-label")).to_have_text("y")
        expect(page.locator("#heatmap")).to_have_attribute("data-state", "error")
        assert "no attention layers" in page.locator("#heatmap-caption").text_content()
        page.close()
