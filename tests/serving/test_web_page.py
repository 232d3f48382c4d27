"""The chat page at / in headless Chromium: a message typed, an answer streamed and rendered as Markdown, a
stop, a reset; the model picker over a server of several models."""

import shutil

import httpx
import pytest
from helpers import API_KEY, live_server, make_pool

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        reason = f"{CHROMIUM} is absent: install Debian's chromium to run the web page test"
        print(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(server, browser):
    page = browser.new_page()
    page.goto(server)
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")  # "change": the page asks /v1/models again, with the key
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'", timeout=10_000)
    yield page
    page.close()


def running(server: str) -> float:
    text = httpx.get(f"{server}/metrics").text
    line = 'llmasos_num_sequences_running{model="tiny"} '
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(line)))


def test_a_typed_message_gets_a_streamed_answer(page, gate):
    gate.hold_after(6)  # the answer's first tokens, then the engine waits: the page must show them already
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "64")
    page.fill("#input", "Once upon a time")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.msg.assistant')?.dataset.text || '').length > 0", timeout=30_000)
    partial = page.get_attribute(".msg.assistant", "data-text")
    assert page.locator(".stats").count() == 0  # not finished: what shows was streamed
    gate.release()
    page.wait_for_selector(".stats", timeout=30_000)
    assert page.inner_text(".msg.user") == "Once upon a time"
    answer = page.get_attribute(".msg.assistant", "data-text")
    stats = page.inner_text(".stats")
    assert answer.strip() and "finish: length" in stats and "first token after" in stats and "tok/s" in stats
    assert answer.startswith(partial) and len(partial) < len(answer)
    shown = page.evaluate("() => document.querySelector('.msg.assistant').innerHTML")
    assert shown == page.evaluate("text => renderMarkdown(text)", answer)  # rendered as Markdown


def test_stop_ends_the_answer_and_frees_the_slot_and_reset_clears(page, server, gate):
    gate.hold_after(6)  # the answer cannot finish before the page stops it
    page.fill("#max-tokens", "500")
    page.fill("#input", "Tell me a long story")
    page.click("#send")
    # Stop at the answer's first text, from inside the page.
    page.evaluate("""() => new Promise(resolve => {
        const stopOnText = () => {
            const answer = document.querySelectorAll('.msg.assistant')[1];
            if (!answer || !answer.textContent.length) return false;
            document.getElementById('stop').click();
            resolve();
            return true;
        };
        if (stopOnText()) return;
        const watch = new MutationObserver(() => { if (stopOnText()) watch.disconnect(); });
        watch.observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    })""")
    page.wait_for_function("document.querySelectorAll('.stats').length === 2", timeout=10_000)
    assert "finish: stopped" in page.inner_text(".stats >> nth=1")
    deadline = 50
    while running(server) and deadline:
        page.wait_for_timeout(100)
        deadline -= 1
    assert running(server) == 0
    page.click("#reset")
    assert page.locator(".msg").count() == 0


MARKDOWN = """# Title

Some **bold**, *italics* and `code <b>`, a [link](https://example.com/a?b=1&c=2) and [no link](javascript:alert(1)).

```python
print('<script>alert(1)</script>')
```

- one
- two

1. first
2. second

> quoted

<img src=x onerror=alert(1)>"""


def test_the_markdown_renderer_formats_and_escapes(page):
    html = page.evaluate("text => renderMarkdown(text)", MARKDOWN)
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<em>italics</em>" in html
    assert "<code>code &lt;b&gt;</code>" in html
    assert '<a href="https://example.com/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">link</a>' in html
    assert "[no link](javascript:alert(1))" in html  # only http(s) links become links
    assert '<pre><code class="language-python">print(&#39;&lt;script&gt;alert(1)&lt;/script&gt;&#39;)</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li><li>second</li></ol>" in html
    assert "<blockquote><p>quoted</p></blockquote>" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    unclosed = page.evaluate("text => renderMarkdown(text)", "Here:\n```js\nlet a = 1;")  # mid-stream
    assert unclosed == '<p>Here:</p><pre><code class="language-js">let a = 1;</code></pre>'


def test_the_model_picker_offers_every_model_and_the_answer_comes_from_the_one_picked(store, browser):
    with live_server(make_pool(names=["alpha", "beta", "gamma"])) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#model option').length === 3", timeout=10_000)
        assert page.eval_on_selector_all("#model option", "options => options.map(o => o.value)") == ["alpha", "beta", "gamma"]
        page.select_option("#model", "beta")
        page.fill("#max-tokens", "8")
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        page.wait_for_selector(".stats", timeout=60_000)
        stats = page.inner_text(".stats")
        assert stats.startswith("beta") and "first token after" in stats  # the wait includes beta's load
        assert [m["model"] for m in httpx.get(f"{url}/api/ps").json()["models"]] == ["beta:latest"]


def test_a_tool_call_shows_and_its_result_is_sent_back(browser, tmp_path):
    """On a model whose template takes tools: the call shows in the answer, the next message is its result."""
    import json

    from helpers import CITY_WEATHER_TOOL, live_server, make_tool_model

    from llmasos import LLM

    path = make_tool_model(tmp_path / "tools", "hermes")
    with live_server(LLM.load(path), served_model_name="tiny") as url:
        page = browser.new_page()
        page.goto(url)
        page.click("summary")
        page.fill("#tools", json.dumps([CITY_WEATHER_TOOL]))
        page.select_option("#tool-choice", "required")
        page.fill("#max-tokens", "200")
        page.fill("#input", "Weather in Paris?")
        page.press("#input", "Enter")
        page.wait_for_selector(".stats", timeout=60_000)
        assert page.inner_text(".tool-call").startswith("get_weather({") and "finish: tool_calls" in page.inner_text(".stats")
        assert page.get_attribute("#input", "placeholder") == "What get_weather returned"
        page.select_option("#tool-choice", "auto")
        page.fill("#max-tokens", "5")
        page.fill("#input", "21 C")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.stats').length === 2", timeout=60_000)
        assert page.inner_text(".msg.tool") == "get_weather → 21 C" and page.locator(".msg.error").count() == 0
        page.close()
