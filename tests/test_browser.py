"""The chat page in a real headless Chromium (selenium): type, watch the reply stream in, edit, regenerate,
new chat, light and dark colour schemes. The server is serve.app on a loopback port with a fake engine.

Needs Debian's chromium + chromium-driver (`apt-get install -y chromium chromium-driver`) and `pip install
selenium`; skips, saying why, when either is missing. Screenshots go to <repo>/artifacts/ (gitignored).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from serving import FakeEngine, serve_in_thread
from serve.app import Defaults, create_app

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
REPLIES = ["Hello! I am a tiny fake model, streaming one byte at a time. Ünïcödé 😀 works too.",
           "A second, regenerated answer.",
           "An answer to the edited question."]


def _find(*names):
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


class ScriptedEngine(FakeEngine):
    """Streams the next reply of REPLIES (cycling) as byte tokens, `delay` s per token; `prompts` records them."""

    def __init__(self, tok, delay):
        self.n, self.prompts = 0, []
        super().__init__(tok, self.next_reply, delay=delay)

    def next_reply(self, tokens):
        reply, self.n = REPLIES[self.n % len(REPLIES)], self.n + 1
        self.prompts.append(list(tokens))
        return list(reply.encode("utf-8"))


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        print("SKIP reason: selenium not installed (pip install selenium)")
        pytest.skip("selenium not installed (pip install selenium)")
    chromium = _find("chromium", "chromium-browser", "google-chrome")
    driver_path = _find("chromedriver")
    if not chromium or not driver_path:
        reason = "no chromium/chromedriver on PATH (apt-get install -y chromium chromium-driver)"
        print("SKIP reason:", reason)
        pytest.skip(reason)
    profile = tempfile.mkdtemp(prefix="jaxchat-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    from jaxchat.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(["hello world, a tiny fake model answers. " * 30], vocab_size=280)
    engine = ScriptedEngine(tok, delay=0.015)
    app = create_app(engine, tok, Defaults(model="fake/d0"))
    srv, url = serve_in_thread(app)
    yield url, engine, tok
    srv.stop()


def _wait(cond, timeout=15.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _shot(driver, name):
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def test_chat_in_browser(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, engine, tok = server
    d = browser
    d.get(url + "/")
    _wait(lambda: d.find_element(By.ID, "model").text == "fake/d0", what="/health to fill the model badge")
    assert d.find_element(By.ID, "empty").is_displayed()
    send = d.find_element(By.ID, "send")
    assert not send.is_enabled()  # nothing typed yet

    box = d.find_element(By.ID, "input")
    assert d.switch_to.active_element == box  # focused on load
    box.send_keys("What is a tiny model?")
    assert send.is_enabled()
    box.send_keys(Keys.ENTER)

    _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.user .body"), what="user bubble")
    assert d.find_element(By.CSS_SELECTOR, ".msg.user .body").text == "What is a tiny model?"
    assert d.find_element(By.ID, "input").get_attribute("value") == ""
    # streaming: the reply must be seen partly written before it is complete
    seen = set()

    def complete():
        bodies = d.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")
        text = bodies[-1].text if bodies else ""
        seen.add(text)
        return text == REPLIES[0]

    _wait(complete, what="first reply")
    partial = [s for s in seen if s and s != REPLIES[0]]
    assert partial and all(REPLIES[0].startswith(p) for p in partial), seen
    assert all("\ufffd" not in s for s in seen)
    assert d.find_element(By.ID, "send").text == "Send"
    _wait(lambda: d.find_elements(By.XPATH, "//button[text()='Regenerate']"), what="regenerate button")
    assert d.find_elements(By.XPATH, "//button[text()='Edit']")
    s = tok.encode_special
    assert engine.prompts[0][-1] == s("<|assistant_start|>") and engine.prompts[0][0] == tok.get_bos_token_id()
    _shot(d, "chat_light.png")

    # regenerate the last reply
    d.find_element(By.XPATH, "//button[text()='Regenerate']").click()
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")[-1].text == REPLIES[1], what="regenerated")
    assert len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
    assert engine.prompts[1] == engine.prompts[0]  # same conversation re-sent

    # edit the last user message and regenerate from it
    d.find_element(By.XPATH, "//button[text()='Edit']").click()
    edit = _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".edit-box textarea"), what="edit box")[0]
    edit.clear()
    edit.send_keys("What is an edited question?")
    d.find_element(By.XPATH, "//button[text()='Save & regenerate']").click()
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")[-1].text == REPLIES[2], what="edited reply")
    assert [e.text for e in d.find_elements(By.CSS_SELECTOR, ".msg.user .body")] == ["What is an edited question?"]
    assert tok.decode(engine.prompts[2]).count("What is an edited question?") == 1

    # a second turn carries the whole conversation
    box = d.find_element(By.ID, "input")
    box.send_keys("And then?", Keys.ENTER)
    _wait(lambda: len(engine.prompts) == 4 and d.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")[-1].text
          == REPLIES[0], what="second turn")
    text = tok.decode(engine.prompts[3])
    assert "What is an edited question?" in text and REPLIES[2] in text and "And then?" in text
    _shot(d, "chat_two_turns.png")

    # dark mode follows the system preference
    d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    bg = d.execute_script("return getComputedStyle(document.body).backgroundColor")
    rgb = [int(x) for x in bg[bg.index("(") + 1:bg.index(")")].split(",")[:3]]
    assert sum(rgb) < 150, bg
    _shot(d, "chat_dark.png")
    d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "light"}]})
    bg = d.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert bg in ("rgb(255, 255, 255)", "rgba(255, 255, 255, 1)"), bg

    # new chat clears everything
    d.find_element(By.ID, "newChat").click()
    assert d.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert d.find_element(By.ID, "empty").is_displayed()
    box = d.find_element(By.ID, "input")
    box.send_keys("Fresh start", Keys.ENTER)
    _wait(lambda: len(engine.prompts) == 5, what="fresh request")
    fresh = tok.decode(engine.prompts[4])
    assert "Fresh start" in fresh and "edited" not in fresh
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")[-1].text == REPLIES[1], what="fresh reply")


def test_server_error_shown_in_page(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _, _ = server
    d = browser
    d.get(url + "/")
    # a message over the 8000-character limit (bypassing the textarea's maxlength) gets the server's 400 reason
    d.execute_script("document.getElementById('input').removeAttribute('maxlength');"
                     "document.getElementById('input').value = 'x'.repeat(8001);"
                     "document.getElementById('input').dispatchEvent(new Event('input'));")
    d.find_element(By.ID, "input").send_keys(Keys.ENTER)
    err = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "[role=alert]"), what="error alert")[0]
    assert "too long" in err.text
    _shot(d, "chat_error.png")
