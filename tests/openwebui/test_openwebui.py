"""Open WebUI, as its users run it, against `lva serve`: headless Chromium sends a text message and a question
about an attached image, and the answers must appear, not errors.

Open WebUI keeps its default settings, tools included: 0.12.4 sends its 36 built-in tools with every message
(8,100 tokens in Llama 3's template), which lva's default context leaves out (docs/SERVER.md). Only what running
it offline needs is set (the issue's settings), and the model every new chat starts with. Both of Open WebUI's
connections are tried: as Ollama (/api/chat) and as OpenAI (/v1/chat/completions).

`make test-openwebui` installs Open WebUI from PyPI in its own environment (a CPU torch first), Debian's chromium
and chromium-driver, and selenium, and runs these tests with `--openwebui PATH` (its `open-webui` command);
`make test` does not collect them.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import WebDriverWait

from tests.server.lva_server import FIXTURES, LvaServer, store_with_tiny_model

IMAGE = FIXTURES / "images" / "rgb_173x97.png"
MODEL = "tiny-a-F32"
START_SECONDS = 240                  # Open WebUI's first start migrates its database
ANSWER_SECONDS = 300                 # the answer, behind Open WebUI's own requests (a title, tags) in lva's queue
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", params=["ollama", "openai"])
def connection(request: pytest.FixtureRequest) -> str:
    """How Open WebUI is connected to lva: as to Ollama, or as to OpenAI."""
    return request.param


@pytest.fixture(scope="module")
def lva(connection: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LvaServer]:
    """`lva serve` with its defaults, but for a limit on the answer: the tiny model's noise rarely ends by itself.
    One per connection, so each encodes the image afresh (lva keeps image features on disk)."""
    home = store_with_tiny_model(tmp_path_factory.mktemp(f"lva-{connection}"))
    with LvaServer(home, "--model", "tiny-a", "--max-tokens", "48") as server:
        yield server


def connection_settings(connection: str, lva_url: str) -> dict[str, str]:
    if connection == "ollama":
        return {"ENABLE_OLLAMA_API": "true", "OLLAMA_BASE_URL": lva_url, "ENABLE_OPENAI_API": "false"}
    return {"ENABLE_OPENAI_API": "true", "OPENAI_API_BASE_URL": f"{lva_url}/v1", "OPENAI_API_KEY": "lva",
            "ENABLE_OLLAMA_API": "false"}


@pytest.fixture(scope="module")
def openwebui(request: pytest.FixtureRequest, connection: str, lva: LvaServer,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running Open WebUI on 127.0.0.1, connected to lva; its URL."""
    data = tmp_path_factory.mktemp(f"openwebui-{connection}")
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(data), "OFFLINE_MODE": "true", "RAG_EMBEDDING_ENGINE": "ollama",
           "BYPASS_EMBEDDING_AND_RETRIEVAL": "true", "ENABLE_VERSION_UPDATE_CHECK": "false", "WEBUI_AUTH": "False",
           "DEFAULT_MODELS": MODEL, "HF_HOME": str(data / "hf"), **connection_settings(connection, lva.url)}
    log = data / "open-webui.log"
    with log.open("w") as out:                       # cwd: it writes its secret key file there
        command = os.path.abspath(request.config.getoption("--openwebui"))
        process = subprocess.Popen([command, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=data, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Open WebUI did not start ({process.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = Options()
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium'}"]:
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.save_screenshot(str(tmp_path / "last.png"))          # pytest keeps tmp_path: look at it on failure
        driver.quit()


def ask(browser: webdriver.Chrome, url: str, text: str, image: Path | None = None) -> tuple[dict, dict]:
    """Send a message in a new chat as a person does; Open WebUI's record of it and of the answer, once done."""
    browser.get(url)
    try:                                             # a new user first sees the release notes
        WebDriverWait(browser, 10).until(ready.element_to_be_clickable(
            (By.XPATH, "//button[contains(., \"Let's Go\")]"))).click()
    except TimeoutException:
        pass
    box = WebDriverWait(browser, 30).until(ready.element_to_be_clickable((By.ID, "chat-input")))
    assert browser.find_element(By.ID, "model-selector-model-button").text.strip() == MODEL
    if image is not None:
        browser.find_element(By.CSS_SELECTOR, "input[type=file][multiple]").send_keys(str(image))
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#message-input-container img"))
    box.click()
    box.send_keys(text)
    WebDriverWait(browser, 60).until(lambda b: _sent(b))
    chat_id = browser.current_url.rstrip("/").rsplit("/", 1)[-1]
    deadline = time.monotonic() + ANSWER_SECONDS
    while True:
        messages = _chat(browser, chat_id)["chat"]["history"]["messages"].values()
        question = next(m for m in messages if m["role"] == "user")
        answer = next((m for m in messages if m["role"] == "assistant" and m.get("done")), None)
        if answer is not None:
            return question, answer
        assert time.monotonic() < deadline, f"no answer in {ANSWER_SECONDS} s: {list(messages)}"
        time.sleep(1)


def _sent(browser: webdriver.Chrome) -> bool:
    """Enter sends once the attachment has uploaded; until the chat has its own page, press it again."""
    if "/c/" in browser.current_url:
        return True
    browser.find_element(By.ID, "chat-input").send_keys(Keys.ENTER)
    return "/c/" in browser.current_url


def _chat(browser: webdriver.Chrome, chat_id: str) -> dict:
    """The chat as Open WebUI's backend keeps it, read with the page's own session."""
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/v1/chats/' + arguments[0], {headers: {Authorization: 'Bearer ' + localStorage.token}})"
        ".then(r => r.json()).then(done, e => done({error: String(e)}));", chat_id)


def assert_answered(browser: webdriver.Chrome, answer: dict) -> None:
    """An answer, not an error: Open WebUI keeps an error on the message and shows it in place of the answer."""
    assert not answer.get("error"), answer.get("error")
    assert answer["content"].strip() and answer["model"] == MODEL
    shown = browser.find_elements(By.CSS_SELECTOR, ".chat-assistant #response-content-container")
    assert shown and shown[-1].text.strip()


def refused(lva: LvaServer) -> list[str]:
    """The requests lva answered with an error (its log: time, method, path, status, ...); 499 is a client that
    left, as Open WebUI does with its own background requests when it stops."""
    return [line for line in lva.log().splitlines() if re.match(r"\S+ [A-Z]+ \S+ (4(?!99)\d\d|5\d\d) ", line)]


def test_a_text_message_is_answered(browser: webdriver.Chrome, openwebui: str, lva: LvaServer) -> None:
    question, answer = ask(browser, openwebui, "Hello! What can you do?")
    assert question["content"] == "Hello! What can you do?"
    assert_answered(browser, answer)
    lva.wait_for_log(r" POST /(api/chat|v1/chat/completions) 200 \d+\+\d+ tokens")
    assert not refused(lva)


def test_a_question_about_an_attached_image_is_answered(browser: webdriver.Chrome, openwebui: str,
                                                        lva: LvaServer) -> None:
    question, answer = ask(browser, openwebui, "What is in this picture?", image=IMAGE)
    assert [f["name"] for f in question.get("files", [])] == [IMAGE.name]
    assert_answered(browser, answer)
    lva.wait_for_log(r" 200 \d+\+\d+ tokens, \d+ evaluated, 1 images encoded")
    assert not refused(lva)
