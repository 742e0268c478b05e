"""The chat page at /, in a real browser: Debian's Chromium driven by Playwright, against a real server.

Each state is saved as a screenshot under the test's temporary folder (``pytest --basetemp=DIR`` keeps them in
DIR/test_chat_page0/).
"""

from __future__ import annotations

import json
import re
import shutil
import time

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from gemmakit.server import create_app
from serving import Server


KEY = "page-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(llm):
    with Server(create_app(llm, model_name="gemma3-270m", api_keys=[KEY])) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    # No skip when the browser is missing: `make test` installs it, and a page left untested is a failure.
    assert CHROMIUM, "Chromium is not installed (apt-get install chromium; `make test` does it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _record_growth(page: Page) -> None:
    """Note the length of the last answer's text at every change of the page (to see it arrive in pieces)."""
    page.evaluate("""() => {
        window.answerLengths = [];
        new MutationObserver(() => {
            const all = document.querySelectorAll('.message.assistant .content');
            if (all.length) window.answerLengths.push(all[all.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")


def _set_settings(page: Page, **values: str) -> None:
    if page.get_attribute("#toggle-settings", "aria-expanded") != "true":
        page.click("#toggle-settings")
    for field, value in values.items():
        page.fill(f"#{field}", value)
        page.dispatch_event(f"#{field}", "change")


def _send(page: Page, text: str) -> dict:
    """Type a message, press Enter, and return the JSON body the page posted."""
    page.fill("#input", text)
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.press("#input", "Enter")
    return json.loads(request.value.post_data)


def test_chat_page(server, browser, tmp_path) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    expect(page.locator("#api-key-row")).to_be_visible()  # the server wants a key: the page asks for one
    page.screenshot(path=tmp_path / "1-empty.png")

    # Settings are sent with the request: key, system prompt, sampling.
    _set_settings(page, **{"api-key": KEY, "system-prompt": "Answer in one sentence.", "temperature": "0",
                           "max-tokens": "48", "top-p": "0.9", "seed": "7"})
    expect(page.locator("#model-name")).to_have_text("gemma3-270m")
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")  # a new line, not a send
    page.type("#input", "second line")
    assert page.input_value("#input") == "first line\nsecond line"
    assert page.locator(".message").count() == 0
    _record_growth(page)
    body = _send(page, "What is the capital of France?")
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 48
    assert body["top_p"] == 0.9 and body["seed"] == 7
    assert body["messages"] == [{"role": "system", "content": "Answer in one sentence."},
                                {"role": "user", "content": "What is the capital of France?"}]
    expect(page.locator(".message.assistant .content").last).not_to_have_text("", timeout=60_000)
    page.screenshot(path=tmp_path / "2-streaming.png")
    expect(page.locator("#send")).to_be_visible(timeout=120_000)  # the answer is complete
    lengths = sorted(set(page.evaluate("window.answerLengths")) - {0})
    assert len(lengths) >= 3, f"the answer did not arrive in pieces: {lengths}"
    stats = page.locator(".message.assistant .stats").last.inner_text()
    assert re.fullmatch(r"\d+ tokens, [\d.]+ tok/s.*", stats), stats
    page.screenshot(path=tmp_path / "3-answered.png")

    # Stop a long answer: the request is cancelled on the server, whose metrics count it.
    cancelled_before = _metric(server, "gemmakit_requests_cancelled_total")
    _set_settings(page, **{"max-tokens": "3000", "temperature": "1", "system-prompt": ""})
    _send(page, "Write a very long story about a lighthouse keeper.")
    expect(page.locator(".message.assistant .content").last).not_to_have_text("", timeout=60_000)
    page.screenshot(path=tmp_path / "4-before-stop.png")
    page.click("#stop")
    expect(page.locator("#send")).to_be_visible(timeout=10_000)
    expect(page.locator(".message.assistant .stats").last).to_have_text("stopped")
    deadline = time.time() + 10
    while _metric(server, "gemmakit_requests_cancelled_total") <= cancelled_before and time.time() < deadline:
        time.sleep(0.1)
    assert _metric(server, "gemmakit_requests_cancelled_total") == cancelled_before + 1
    assert _metric(server, "gemmakit_running_sequences") == 0  # its cache row is free again
    page.screenshot(path=tmp_path / "5-stopped.png")

    # Reload: the conversation and the settings come back from localStorage.
    page.reload()
    expect(page.locator("#conversations .open")).to_have_count(1)
    expect(page.locator("#conversations .open").first).to_have_text("What is the capital of France?")
    expect(page.locator(".message.user")).to_have_count(2)
    expect(page.locator(".message.user").first).to_have_text("What is the capital of France?")
    assert page.input_value("#max-tokens") == "3000"
    page.screenshot(path=tmp_path / "6-reloaded.png")
    assert errors == []


def test_markdown_is_rendered_and_sanitized(server, browser, tmp_path) -> None:
    """Answers render as Markdown with code blocks; HTML in them cannot run (DOMPurify and the page's CSP)."""
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    page.goto(server.url + "/")
    answer = ("Here is **code**:\n\n```python\nprint('hi')\n```\n\n<img src=x onerror=\"window.pwned=1\">"
              "<script>window.pwned=2</script>")
    tool_call = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    stored = [{"id": "c1", "title": "Saved", "updated": 1, "messages": [
        {"role": "user", "content": "<b>not bold</b>"},
        {"role": "assistant", "content": answer, "stats": "5 tokens", "reasoning": "The user wants *code*.",
         "tool_calls": [tool_call]}]}]
    page.evaluate("s => localStorage.setItem('gemmakit.conversations', s)", json.dumps(stored))
    page.reload()
    expect(page.locator(".message.assistant pre code")).to_have_text("print('hi')")
    expect(page.locator(".message.assistant strong")).to_have_text("code")
    expect(page.locator(".message.user")).to_have_text("<b>not bold</b>")  # user text is text, not HTML
    assert page.locator(".message.assistant img[onerror]").count() == 0
    assert page.locator(".message script").count() == 0
    assert page.evaluate("window.pwned") is None
    # Gemma 4's thought channel shows folded; a tool call shows as a call, not as text of the answer.
    reasoning = page.locator(".message.assistant details.reasoning")
    assert reasoning.get_attribute("open") is None
    expect(reasoning.locator("summary")).to_have_text("Reasoning")
    expect(reasoning.locator("em")).to_have_text("code")
    expect(page.locator(".message.assistant .tool-call")).to_have_text('tool call: get_weather({"city": "Paris"})')
    # Phone width: the conversation list is folded away behind its button, the composer fits the screen.
    assert not page.locator("#sidebar").is_visible() or page.locator("#sidebar").bounding_box()["x"] < 0
    box = page.locator("#composer").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    page.screenshot(path=tmp_path / "phone-chat.png")
    page.click("#toggle-sidebar")
    expect(page.locator("#sidebar")).to_have_class(re.compile("open"))
    page.wait_for_timeout(400)  # the slide-in transition
    assert page.locator("#sidebar").bounding_box()["x"] == 0
    page.screenshot(path=tmp_path / "phone-sidebar.png")


def test_keyboard_only(server, browser) -> None:
    """The page can be used without a mouse: Tab reaches the message box, Enter sends, Escape stops."""
    page = browser.new_page()
    page.goto(server.url + "/")
    page.evaluate(f"localStorage.setItem('gemmakit.settings', JSON.stringify({{apiKey: '{KEY}', max_tokens: 2000}}))")
    page.reload()
    page.keyboard.press("Tab")
    for _ in range(20):
        if page.evaluate("document.activeElement.id") == "input":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "input"
    page.keyboard.type("Tell me a long story.")
    page.keyboard.press("Enter")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator(".message.assistant .content").last).not_to_have_text("", timeout=60_000)
    page.keyboard.press("Escape")
    expect(page.locator("#send")).to_be_visible(timeout=10_000)
    expect(page.locator(".message.assistant .stats").last).to_have_text("stopped")
