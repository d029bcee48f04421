"""The chat page in headless Chromium (Debian's, driven by Playwright): type a message, watch the answer stream in,
fold and unfold the reasoning, find the conversation again after a reload, and see that the page asks nothing of
any other host."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from helpers_serve import ANSWER, REASONING, LiveServer, save_model_dir

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium; installed here with apt-get on a fresh machine when we are root."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("needs Debian's chromium at /usr/bin/chromium: run `apt-get install -y chromium` as root")
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0 or not CHROMIUM.exists():
            pytest.fail(f"`{' '.join(install)}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return CHROMIUM


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(save_model_dir(tmp_path_factory.mktemp("browser") / "tiny"))  # no key: loopback only
    yield live
    live.stop()


# Records every value the last answer's text and reasoning take while the page streams.
WATCH = """() => {
  window.seen = { content: [], reasoning: [] };
  new MutationObserver(() => {
    const turns = document.querySelectorAll(".turn.assistant");
    const last = turns[turns.length - 1];
    if (!last) return;
    for (const [key, cls] of [["content", ".content"], ["reasoning", ".reasoning-text"]]) {
      const text = last.querySelector(cls).textContent;
      const list = window.seen[key];
      if (text && list[list.length - 1] !== text) list.push(text);
    }
  }).observe(document.getElementById("log"), { childList: true, subtree: true, characterData: true });
}"""


def test_chat_page_streams_the_answer_and_folds_the_reasoning(chromium, server):
    from playwright.sync_api import expect, sync_playwright

    origin = urlsplit(server.url).netloc
    requests, console_errors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_have_text("tiny")
            page.evaluate(WATCH)

            page.locator("#input").fill("Hello")
            page.keyboard.press("Enter")
            answer = page.locator(".turn.assistant .content").last
            expect(answer).to_have_text(ANSWER, timeout=30_000)
            expect(page.locator(".turn.user").last).to_have_text("Hello")
            expect(page.locator("#send")).to_have_text("Send")  # the stream is over

            seen = page.evaluate("window.seen")
            assert len(seen["content"]) > 1 and seen["content"][-1] == ANSWER  # it grew piece by piece
            assert all(ANSWER.startswith(partial) for partial in seen["content"])
            assert len(seen["reasoning"]) > 1 and seen["reasoning"][-1] == REASONING

            block = page.locator(".turn.assistant details.reasoning").last
            expect(block.locator("summary")).to_have_text("Reasoning")
            reasoning = block.locator(".reasoning-text")
            expect(reasoning).to_have_text(REASONING)
            assert block.evaluate("d => d.open") is False  # folded once the answer is there
            expect(reasoning).to_be_hidden()
            block.locator("summary").click()
            expect(reasoning).to_be_visible()
            assert block.evaluate("d => d.open") is True
            block.locator("summary").click()
            expect(reasoning).to_be_hidden()

            page.reload()  # the conversation lives in this browser's storage only
            expect(page.locator(".turn.assistant .content").last).to_have_text(ANSWER)
            stored = page.evaluate("JSON.parse(localStorage.getItem('openseek.chat'))")
            assert stored == [{"role": "user", "content": "Hello"},
                              {"role": "assistant", "reasoning": REASONING, "content": ANSWER}]
            page.locator("#new").click()
            expect(page.locator(".turn")).to_have_count(0)
        finally:
            browser.close()

    assert requests and all(urlsplit(url).netloc == origin for url in requests), requests  # nothing leaves
    assert console_errors == []  # no CSP violation, no script error
