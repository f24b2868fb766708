"""`lva serve` against bad input, leaving clients, an API key and the network: it answers 4xx in each API's
shape, keeps serving, stops work nobody waits for, and listens only on this machine unless told."""

from __future__ import annotations

import base64
import json
import socket
import struct
import zlib
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from assistant.server.inputs import MAX_BODY_BYTES
from tests.conftest import run_lva
from tests.server.lva_server import FIXTURES, LvaServer

IMAGE = FIXTURES / "images" / "rgb_173x97.png"
# An answer that runs until the context is full: JSON whose one string has at least 4000 characters (the grammar
# allows the end of the turn only after them), with no num_predict limit.
LONG = {"format": {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}},
                   "required": ["story"]}, "options": {"temperature": 1.0, "seed": 1}}



def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decompression_bomb() -> bytes:
    """A small PNG whose header says 30000 × 30000 pixels, as a decompression bomb's does."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 30001 * 4))
            + chunk(b"IEND", b""))


def chat(messages: list) -> dict:
    return {"model": "tiny-a", "messages": messages, "options": {"num_predict": 2}}


def completion(messages: list) -> dict:
    return {"model": "tiny-a", "messages": messages, "max_tokens": 2}


def image_part(url: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                        {"type": "image_url", "image_url": {"url": url}}]}


USER = [{"role": "user", "content": "Hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NOT_AN_IMAGE = b64(b"these are words, not pixels")
BAD_INPUT = {
    "malformed JSON": ("/api/chat", b'{"model": "tiny-a", "messages": [', 400, "not valid JSON"),
    "malformed JSON (OpenAI)": ("/v1/chat/completions", b'{"messages": [}', 400, "not valid JSON"),
    "not an object": ("/api/chat", [1, 2], 400, "must be a JSON object"),
    "missing messages": ("/api/chat", {"model": "tiny-a"}, 400, "messages is required"),
    "empty messages": ("/api/chat", chat([]), 400, "must not be empty"),
    "missing messages (OpenAI)": ("/v1/chat/completions", {"model": "tiny-a"}, 400, "messages must be"),
    "empty messages (OpenAI)": ("/v1/chat/completions", completion([]), 400, "messages must be a non-empty list"),
    "no user message": ("/api/chat", chat([{"role": "system", "content": "Be brief."}]), 400, "no user message"),
    "an image that is not base64": ("/api/chat", chat([{**USER[0], "images": ["%%%"]}]), 400, "not base64"),
    "an image that is not an image": ("/api/chat", chat([{**USER[0], "images": [NOT_AN_IMAGE]}]), 400,
                                      "not an image"),
    "an image that is not an image (OpenAI)": ("/v1/chat/completions",
                                               completion([image_part(f"data:image/png;base64,{NOT_AN_IMAGE}")]),
                                               400, "not an image"),
    "a decompression bomb": ("/api/generate", {"model": "tiny-a", "prompt": "Hi",
                                               "images": [b64(decompression_bomb())]}, 400, "too large to open safely"),
    "a remote image URL": ("/v1/chat/completions", completion([image_part("https://example.com/cat.png")]), 400,
                           "does not fetch images"),
    "a wrong type (messages)": ("/api/chat", {"model": "tiny-a", "messages": "Hi"}, 400, "messages: "),
    "a wrong type (options)": ("/api/chat", {**chat(USER), "options": {"temperature": "warm"}}, 400,
                               "options.temperature: "),
    "a wrong type (stream)": ("/v1/chat/completions", {**completion(USER), "stream": "yes"}, 400, "stream: "),
    "a wrong type (max_tokens)": ("/v1/chat/completions", {**completion(USER), "max_tokens": "ten"}, 400,
                                  "max_tokens: "),
    "a context overflow": ("/api/chat", chat([{"role": "user", "content": "word " * 5000}]), 400,
                           "the context holds 4096"),
    "a context overflow (OpenAI)": ("/v1/chat/completions", completion([{"role": "user", "content": "word " * 5000}]),
                                    400, "the context holds 4096"),
    "an unknown model": ("/api/chat", {**chat(USER), "model": "llava"}, 404, "model 'llava' not found"),
    "an unknown model (OpenAI)": ("/v1/chat/completions", {**completion(USER), "model": "gpt-4o"}, 404, "not found"),
    "an image with a system prompt (the template refuses)": (
        "/api/chat", chat([{"role": "system", "content": "Be brief."},
                           {**USER[0], "images": [b64(IMAGE.read_bytes())]}]),
        400, "incompatible with system messages"),
    "a tool whose parameters are not a schema": (
        "/api/chat", {**chat(USER), "tools": [{"type": "function", "function": {"name": "f", "parameters": "city"}}]},
        400, "tools[0].function.parameters must be a JSON schema"),
    "a tool without a name (OpenAI)": (
        "/v1/chat/completions", {**completion(USER), "tools": [WEATHER, {"type": "function", "function": {}}]},
        400, "tools[1].function.name must be a non-empty string"),
    "a schema no grammar can follow (OpenAI)": (
        "/v1/chat/completions", {**completion(USER), "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
                "when": {"$ref": "#/$defs/missing"}}}}}]}, 400, "tools: the JSON schema cannot be used"),
    "a call to an unknown tool in the history": (
        "/api/chat", {**chat(USER + [{"role": "assistant", "tool_calls": [{"function": {"name": "get_time",
                                                                                       "arguments": {}}}]},
                                     {"role": "tool", "content": "12:00"}]), "tools": [WEATHER]},
        400, "messages[1].tool_calls[0].function.name: 'get_time' is not among the request's tools (get_weather)"),
    "a call to an unknown tool in the history (OpenAI)": (
        "/v1/chat/completions", {**completion(USER + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]), "tools": [WEATHER]},
        400, "'get_time' is not among the request's tools"),
    "call arguments that are not JSON (OpenAI)": (
        "/v1/chat/completions", {**completion(USER + [{"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "22"}]), "tools": [WEATHER]},
        400, "messages[1].tool_calls[0].function.arguments must be a JSON object"),
    "tool_choice naming a missing tool (OpenAI)": (
        "/v1/chat/completions", {**completion(USER), "tools": [WEATHER],
                                 "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        400, "tool_choice names the function 'get_time', which is not among the request's tools (get_weather)"),
    "tool_choice naming a missing tool": (
        "/api/chat", {**chat(USER), "tools": [WEATHER], "options": {
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}}},
        400, "options.tool_choice names the function 'get_time'"),
    "tool_choice required without tools (OpenAI)": (
        "/v1/chat/completions", {**completion(USER), "tool_choice": "required"}, 400,
        "tool_choice is 'required' but the request offers no tools"),
    "a required tool call with an image": (
        "/api/chat", {**chat([{**USER[0], "images": [b64(IMAGE.read_bytes())]}]), "tools": [WEATHER],
                      "options": {"tool_choice": "required"}}, 400, "does not call tools with an image"),
    "two tool calls in one message (the template refuses)": (
        "/v1/chat/completions", {**completion(USER + [{"role": "assistant", "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            for i in range(2)]}, {"role": "tool", "tool_call_id": "call_0", "content": "22"}]), "tools": [WEATHER]},
        400, "only supports single tool-calls at once"),
    "a bad keep_alive": ("/api/generate", {"model": "tiny-a", "prompt": "Hi", "keep_alive": "soon"}, 400, "keep_alive"),
    "an unknown route": ("/api/nothing", {}, 404, "no route"),
}


def assert_still_serves(server: LvaServer) -> None:
    answer = httpx.post(f"{server.url}/api/chat", json={**chat(USER), "stream": False}, timeout=60)
    assert answer.status_code == 200 and answer.json()["done"], answer.text


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_a_4xx_in_the_apis_shape_and_the_server_goes_on(server: LvaServer, case: str) -> None:
    path, body, status, message = BAD_INPUT[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}{path}", content=content, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        error = error["message"]
    assert isinstance(error, str) and message in error and "\n" not in error
    assert_still_serves(server)


def test_the_clients_raise_the_servers_errors(server: LvaServer) -> None:
    with pytest.raises(ollama.ResponseError) as ollama_error:
        ollama.Client(host=server.url).chat(model="llava", messages=USER)
    assert ollama_error.value.status_code == 404 and "llava" in ollama_error.value.error
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as openai_error:
        client.chat.completions.create(model="tiny-a", messages=[image_part("http://example.com/a.png")])
    assert openai_error.value.body["param"] == "messages[0].content[1].image_url"


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_body_over_the_limit_is_refused_before_it_is_read(server: LvaServer, path: str) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
        response = b""
        while b"larger than" not in response and (data := connection.recv(65536)):
            response += data                         # no body was sent: the answer comes without it
    assert response.startswith(b"HTTP/1.1 413 ") and b"larger than 100 MiB" in response
    assert_still_serves(server)


def test_a_body_over_the_limit_without_a_length_is_refused_once_it_passes_the_limit(server: LvaServer) -> None:
    def chunks():                                      # chunked transfer encoding: no Content-Length
        for _ in range(MAX_BODY_BYTES // 2**20 + 8):
            yield b" " * 2**20

    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert_still_serves(server)


def test_a_client_leaving_mid_stream_stops_the_answer_and_frees_the_server(server: LvaServer) -> None:
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "Tell me everything."}], **LONG}
    with httpx.stream("POST", f"{server.url}/api/chat", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert not json.loads(next(lines))["done"]
    line = server.wait_for_log(r"POST /api/chat 200 \d+\+(\d+) tokens.*\(the client left\)")[0]
    assert int(line[1]) < 4096                         # stopped long before the context was full
    assert_still_serves(server)


def test_a_queued_request_whose_client_left_is_dropped(home: Path) -> None:
    """With every slot busy (one here), a request waits in the queue; its client gives up, and it is dropped."""
    long_chat = {"model": "tiny-a", "messages": [{"role": "user", "content": "Go on and on."}], **LONG}
    with LvaServer(home, "--model", "tiny-a", "--parallel", "1") as server:
        with httpx.stream("POST", f"{server.url}/api/chat", json=long_chat, timeout=60) as running:
            lines = running.iter_lines()                   # kept: a dropped iterator closes the connection
            next(lines)                                    # the only slot is busy with this answer
            with pytest.raises(httpx.ReadTimeout):         # this one waits in the queue; its client gives up
                httpx.post(f"{server.url}/api/chat", json={**chat(USER), "stream": False}, timeout=1.0)
        server.wait_for_log(r"POST /api/chat 499 dropped: the client left while it waited")
        assert_still_serves(server)


def test_an_api_key_is_required_when_set(home: Path) -> None:
    with LvaServer(home, "--host", "0.0.0.0", env={"LVA_API_KEY": "sesame"}) as server:
        url = server.url.replace("0.0.0.0", "127.0.0.1")
        for path in ("/api/tags", "/v1/models"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
                refused = httpx.get(f"{url}{path}", headers=headers)
                assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
                error = refused.json()["error"]
                assert "API key" in (error["message"] if path.startswith("/v1/") else error)
        key = {"Authorization": "Bearer sesame"}
        assert [m.model for m in ollama.Client(host=url, headers=key).list().models] == ["tiny-a-F32"]
        answer = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0).chat.completions.create(
            model="tiny-a", messages=USER, max_tokens=2)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert "warning" not in server.log()           # bound beyond this machine, but with a key


def _listening_address(port: int) -> str:
    """The local address of the listening TCP socket on `port`, from /proc/net/tcp (IPv4)."""
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = row.split()[1], row.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":             # 0A: LISTEN
            return socket.inet_ntoa(struct.pack("<I", int(address, 16)))
    raise AssertionError(f"nothing listens on port {port}")


def test_it_listens_on_loopback_by_default_and_warns_when_bound_wider_without_a_key(home: Path,
                                                                                     server: LvaServer) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert _listening_address(int(server.url.rsplit(":", 1)[1])) == "127.0.0.1"
    with LvaServer(home, "--host", "0.0.0.0") as exposed:
        assert _listening_address(int(exposed.url.rsplit(":", 1)[1])) == "0.0.0.0"
        assert "warning: listening on 0.0.0.0 without --api-key" in exposed.log()


def test_a_port_in_use_is_a_one_line_error(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_lva("serve", "--port", str(taken.getsockname()[1]), env={"LVA_HOME": str(home)}, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("lva: error: port ") and "in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unknown_model_at_start_is_a_one_line_error(home: Path) -> None:
    result = run_lva("serve", "--port", "0", "--model", "llava", env={"LVA_HOME": str(home)}, timeout=60)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "no model named 'llava'" in result.stderr


def test_reads_that_need_no_model_are_answered_while_an_answer_streams(server: LvaServer) -> None:
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "Talk."}], **LONG}
    with httpx.stream("POST", f"{server.url}/api/chat", json=body, timeout=60) as streaming:
        lines = streaming.iter_lines()
        next(lines)
        assert httpx.get(f"{server.url}/api/tags", timeout=5).status_code == 200
        assert httpx.get(f"{server.url}/api/ps", timeout=5).json()["models"][0]["model"] == "tiny-a-F32"
        assert not json.loads(next(lines))["done"]     # still streaming
    assert_still_serves(server)


def test_a_model_that_cannot_be_loaded_is_a_500_and_the_server_goes_on(home: Path, server: LvaServer) -> None:
    broken = home / "models" / "broken-text-F32.gguf"
    broken.write_bytes(b"GGUF but not really")
    try:
        response = httpx.post(f"{server.url}/api/chat", json={**chat(USER), "model": "broken"}, timeout=60)
        assert response.status_code == 500 and "broken-F32 could not be loaded" in response.json()["error"]
        assert_still_serves(server)                    # tiny-a loads again
    finally:
        broken.unlink()
