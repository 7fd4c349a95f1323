"""The chat page (qwen_trtllm/serving/static/index.html) in a real browser: headless Chromium from the operating
system's packages (`make install-browser`: Debian's chromium + chromium-driver; nothing downloads a browser) driven
by Selenium, against a real `examples/qwen/serve.py` process on 127.0.0.1 with a tiny random engine (CPU, fp32).

Checked, as a user does it: a question typed and sent with Enter streams its answer into the page (the bubble's
text grows in several pieces) and the answer equals the API's greedy answer to the same messages; a second question
sends the whole conversation (the request body holds both turns, and the answer equals the API's answer to that
message list, not to the question alone); Stop during a long answer cancels the request on the server (/metrics:
nothing in flight, no KV cache block used, one more cancelled request, fewer tokens than allowed) and the page takes
the next question (a multi-line one: the box grows), whose request carries the stopped answer; a refused request
shows the server's error and leaves its question out of the conversation. Screenshots go to the tests' tmp dirs.
Only loopback traffic: Chromium's background networking is off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from test_serve import MODEL, ROOT, free_port, metrics, script_env, wait_healthy, wait_idle

from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.tokenizer import DEFAULT_SYSTEM

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # reported by the browser fixture: a skip, or under CI a failure
    webdriver = None

pytestmark = pytest.mark.timeout(150)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Chromium without its own traffic (updates, sync, safe browsing, QUIC probes): only loopback is reachable here
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--no-proxy-server", "--window-size=1100,760")
MAX_INPUT_LEN, MAX_OUTPUT_LEN = 512, 1024  # long enough an answer to press Stop in


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser_paths():
    """Chromium, chromedriver and selenium, or a skip that says how to get them (never a skip under CI=true)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if webdriver is None:
        missing.append("the selenium package (requirements-dev.txt)")
    if missing:
        why = (f"the chat page test needs {', '.join(missing)}: `make install-dev` installs them (the browser as root: "
               "`make install-browser` = apt-get install chromium chromium-driver)")
        if in_ci():
            pytest.fail(f"{why}; CI=true, so this is a failure, not a skip")
        pytest.skip(why)
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture(scope="module")
def engine_dir(make_checkpoint, tiktoken_file, tmp_path_factory) -> Path:
    ckpt = make_checkpoint(vocab_size=151936, seq_length=2048, tokenizer_file=tiktoken_file, seed=5)
    return build_engine(tmp_path_factory.mktemp("chat_page") / MODEL, hf_dir=ckpt, dtype="float32",
                        max_batch_size=2, max_input_len=MAX_INPUT_LEN, max_output_len=MAX_OUTPUT_LEN,
                        tokens_per_block=16)


@pytest.fixture(scope="module")
def server(browser_paths, engine_dir, tmp_path_factory):  # no engine built for a skip
    work = tmp_path_factory.mktemp("chat_page_server")
    port, log = free_port(), work / "server.log"
    cmd = [sys.executable, str(ROOT / "examples/qwen/serve.py"), "--engine_dir", str(engine_dir), "--host",
           "127.0.0.1", "--port", str(port), "--num_scheduler_steps", "4"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=script_env(), cwd=work)
    srv = SimpleNamespace(url=f"http://127.0.0.1:{port}", proc=proc,
                          log_tail=lambda: log.read_text(errors="replace")[-3000:])
    try:
        wait_healthy(srv.url, proc, srv.log_tail)
        yield srv
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server, browser_paths, tmp_path_factory):
    """Headless Chromium on the chat page, model id loaded; the page's fetch bodies and the text of every answer
    update are recorded (window.__sent, window.__snaps)."""
    chromium, chromedriver = browser_paths
    profile = tmp_path_factory.mktemp("chromium_profile")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # Selenium Manager never runs (the driver is given), and would stay offline
        driver = webdriver.Chrome(service=Service(executable_path=str(chromedriver),
                                                  log_output=str(profile.parent / "chromedriver.log")),
                                  options=options)
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text.startswith(MODEL))
        driver.execute_script("""
            window.__sent = []; window.__snaps = [];
            const realFetch = window.fetch;
            window.fetch = (url, init) => {
              if (String(url).endsWith("/v1/chat/completions")) window.__sent.push(JSON.parse(init.body));
              return realFetch(url, init);
            };
            new MutationObserver((records) => {
              for (const r of records) for (const n of r.addedNodes)
                if (n.nodeType === Node.TEXT_NODE && n.parentElement.classList.contains("assistant"))
                  window.__snaps.push(n.data);
            }).observe(document.getElementById("log"), { childList: true, subtree: true });
        """)
        yield driver
    finally:
        driver.quit()


# --- helpers -----------------------------------------------------------------------------------------------------
def text_of(el) -> str:
    return el.get_attribute("textContent")


def setting(driver, field: str, value: str) -> None:
    """Type into a header field (temperature, max tokens) as a user does; '' empties it."""
    el = driver.find_element(By.ID, field)
    el.clear()
    if value:
        el.send_keys(value)


def type_question(driver, question: str) -> None:
    """Type it into the message box (Shift+Enter between lines: the box grows with them) and press Enter."""
    driver.execute_script("window.__snaps = [];")
    box = driver.find_element(By.ID, "input")
    one_line = box.size["height"]
    for i, line in enumerate(question.split("\n")):
        if i:
            ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        box.send_keys(line)
    assert box.get_attribute("value") == question
    if "\n" in question:
        assert box.size["height"] > one_line + 10, "the message box did not grow with its lines"
    box.send_keys(Keys.ENTER)


def ready(driver) -> bool:
    """Idle: Send enabled, Stop disabled, no answer pending."""
    return (driver.find_element(By.ID, "send").is_enabled() and not driver.find_element(By.ID, "stop").is_enabled()
            and not driver.find_elements(By.CSS_SELECTOR, ".assistant.pending"))


def ask(driver, question: str, timeout: float = 60) -> tuple[str, str, list[str]]:
    """Send a question and wait for the answer's end: (answer text, the note under it or '', every text the answer
    bubble showed on the way)."""
    requests = len(sent(driver))
    type_question(driver, question)
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: len(sent(d)) > requests and ready(d))
    answer = text_of(driver.find_elements(By.CSS_SELECTOR, "#log .assistant")[-1])
    last = driver.find_element(By.CSS_SELECTOR, "#log > :last-child")
    note = text_of(last) if last.get_attribute("class") == "note" else ""
    return answer, note, driver.execute_script("return window.__snaps;")


def sent(driver) -> list[dict]:
    return driver.execute_script("return window.__sent;")


def api_chat(srv, messages: list[dict], max_tokens: int) -> str:
    """The same messages through the API, greedy, not streamed."""
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def system(driver) -> dict:
    return {"role": "system", "content": driver.find_element(By.ID, "system").get_attribute("value")}


def assert_streamed(snaps: list[str], answer: str) -> None:
    """The bubble showed the answer growing: more than one piece, each text a prefix of the next, the last the
    answer."""
    assert len(snaps) >= 2, f"the answer arrived in one piece: {snaps!r}"
    assert all(b.startswith(a) and len(b) > len(a) for a, b in pairwise(snaps)), snaps
    assert snaps[-1] == answer


# --- the page ----------------------------------------------------------------------------------------------------
def test_streamed_greedy_answers_and_the_conversation_is_sent(page, server, tmp_path):
    assert system(page)["content"] == DEFAULT_SYSTEM
    setting(page, "temperature", "0")
    setting(page, "max_tokens", "24")
    q1 = "你好，请问你叫什么？"
    a1, note1, snaps1 = ask(page, q1)
    first = [system(page), {"role": "user", "content": q1}]
    assert sent(page)[-1]["messages"] == first and sent(page)[-1]["temperature"] == 0
    assert sent(page)[-1]["max_tokens"] == 24 and sent(page)[-1]["stream"] is True
    assert a1 and a1 == api_chat(server, first, 24)
    assert_streamed(snaps1, a1)
    assert "tokens in" in note1, note1

    q2 = "And what can you do for me?"
    a2, _, snaps2 = ask(page, q2)
    both = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    assert sent(page)[-1]["messages"] == both  # the history goes with the question
    assert a2 == api_chat(server, both, 24)  # and the server answered the whole conversation
    assert a2 != api_chat(server, [system(page), {"role": "user", "content": q2}], 24)
    assert_streamed(snaps2, a2)
    bubbles = [(e.get_attribute("class"), text_of(e)) for e in page.find_elements(By.CSS_SELECTOR, "#log .msg")]
    assert bubbles == [("msg user", q1), ("msg assistant", a1), ("msg user", q2), ("msg assistant", a2)]
    shot = tmp_path / "chat_page.png"
    assert page.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    wait_idle(server)


def test_stop_cancels_the_request_and_the_page_takes_the_next_question(page, server, tmp_path):
    page.find_element(By.ID, "clear").click()  # New chat
    assert not page.find_elements(By.CSS_SELECTOR, "#log > *") and ready(page)
    setting(page, "temperature", "0")
    setting(page, "max_tokens", "")  # auto: as long as the engine allows
    before = wait_idle(server)
    q3 = "Tell me a very long story about a lighthouse keeper."
    type_question(page, q3)
    bubble = WebDriverWait(page, 30, poll_frequency=0.02).until(
        lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "#log .assistant.pending") if text_of(e)])[0]
    seen = text_of(bubble)
    WebDriverWait(page, 30, poll_frequency=0.02).until(lambda d: len(text_of(bubble)) > len(seen))  # it streams
    during = metrics(server)
    assert during["qwen_trtllm_num_requests_in_flight"] == 1 and during["qwen_trtllm_kv_cache_blocks_used"] > 0
    page.find_element(By.ID, "stop").click()
    WebDriverWait(page, 10, poll_frequency=0.05).until(
        lambda d: ready(d) and [text_of(n)[:13] for n in d.find_elements(By.CSS_SELECTOR, "#log .note")] == [
            "stopped after"])
    stopped = text_of(bubble)
    assert stopped.startswith(seen) and "error" not in bubble.get_attribute("class")
    assert "max_tokens" not in sent(page)[-1]

    after = wait_idle(server, timeout=10)  # the server cancelled it: no request in flight, no KV cache block used
    assert after["qwen_trtllm_num_requests_running"] == 0 and after["qwen_trtllm_num_requests_waiting"] == 0
    cancelled = 'qwen_trtllm_requests_finished_total{finish_reason="cancelled"}'
    assert after.get(cancelled, 0) == before.get(cancelled, 0) + 1
    generated = after["qwen_trtllm_generation_tokens_total"] - before["qwen_trtllm_generation_tokens_total"]
    assert 0 < generated < MAX_OUTPUT_LEN - 64  # stopped long before the end
    print(f"stopped after {generated} tokens")

    # a refused request: its error in the answer's place, its question greyed out and left out of the conversation
    setting(page, "max_tokens", str(MAX_OUTPUT_LEN + 1))
    bad, note, _ = ask(page, "A question the server refuses")
    assert bad.startswith("⚠ max_tokens") and "max_output_len" in bad and note == ""
    assert page.find_elements(By.CSS_SELECTOR, "#log .msg")[-2].get_attribute("class") == "msg user dropped"

    # ready for the next question; the stopped answer stays in the conversation
    setting(page, "max_tokens", "8")
    q4 = "Thanks, that is enough.\nGood night."
    a4, note4, snaps4 = ask(page, q4)
    messages = [system(page), {"role": "user", "content": q3}, {"role": "assistant", "content": stopped},
                {"role": "user", "content": q4}]
    assert sent(page)[-1]["messages"] == messages
    assert a4 == api_chat(server, messages, 8) and "tokens in" in note4
    assert_streamed(snaps4, a4)
    page.save_screenshot(str(tmp_path / "chat_page_stopped.png"))
    wait_idle(server)
