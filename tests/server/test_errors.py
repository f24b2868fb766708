"""What `lva serve` does with a user's error and with a bug: a user's error is its 4xx in the API's shape and one
log line; a bug is a 500 that says it is one, with its traceback in the server's log and never in the response.
The bugs are planted in the real server by `tests.planted_bug`; everything else is the real thing."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.planted_bug import MESSAGE, TRIGGER
from tests.server.lva_server import LvaServer

TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture(scope="module")
def server(home: Path):
    with LvaServer(home, "--model", "tiny-a", module="tests.planted_bug") as running:
        yield running


def chat(text: str, stream: bool = False) -> dict:
    return {"model": "tiny-a", "messages": [{"role": "user", "content": text}], "stream": stream,
            "options": {"num_predict": 4, "temperature": 0}}


def assert_still_serves(server: LvaServer) -> None:
    answer = httpx.post(f"{server.url}/api/chat", json=chat("Hi"), timeout=60)
    assert answer.status_code == 200 and answer.json()["done"], answer.text


def test_a_user_error_is_a_4xx_and_one_log_line_without_a_traceback(server: LvaServer) -> None:
    response = httpx.post(f"{server.url}/api/chat", json=chat("word " * 5000), timeout=60)
    assert response.status_code == 400 and "the context holds" in response.json()["error"]
    line = server.wait_for_log(r"POST /api/chat 400 ")[0].string
    assert "the context holds" in line
    assert TRACEBACK not in server.log()
    assert_still_serves(server)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_bug_in_the_engine_is_a_500_with_its_traceback_in_the_log_only(server: LvaServer, stream: bool) -> None:
    before = server.log().count(TRACEBACK)
    response = httpx.post(f"{server.url}/api/chat", json=chat(f"Please {TRIGGER}.", stream), timeout=60)
    if stream:                                         # the first piece went out: the error ends the stream
        assert response.status_code == 200
        error = [line for line in response.text.splitlines() if '"error"' in line][-1]
    else:
        assert response.status_code == 500
        error = response.json()["error"]
    assert "internal error" in error and "bug in lva" in error and TRACEBACK not in error
    server.wait_for_log(re.escape(TRACEBACK), count=before + 1)
    assert f"RuntimeError: {MESSAGE}" in server.log() and "_first_piece_then_a_bug" in server.log()
    assert_still_serves(server)


def test_a_bug_is_a_500_in_openais_shape_and_the_client_raises_it(server: LvaServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": TRIGGER}], max_tokens=4)
    assert raised.value.status_code == 500
    assert raised.value.body["type"] == "server_error" and "bug in lva" in raised.value.body["message"]
    assert_still_serves(server)


def test_a_bug_in_a_route_is_a_500_with_its_traceback_in_the_log_only(server: LvaServer) -> None:
    before = server.log().count(TRACEBACK)
    with pytest.raises(ollama.ResponseError) as raised:
        ollama.Client(host=server.url).ps()
    assert raised.value.status_code == 500 and "bug in lva" in raised.value.error
    assert TRACEBACK not in raised.value.error
    server.wait_for_log(r"GET /api/ps 500\b")
    server.wait_for_log(re.escape(TRACEBACK), count=before + 1)
    assert "_running_with_a_bug" in server.log()
    assert_still_serves(server)
