"""`lva serve --parallel N`: requests answered together give what each gets alone, through the real clients.

Four greedy requests, different images (and one without), both APIs, streamed and not, sent at once to a
server with four slots, against the same requests sent one after another to a server with one; the
F32 tiny model, so the answers are the same token for token (and so the same text). And the bad
input of --parallel, and /api/ps's slots.
"""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import openai

from tests.conftest import run_lva
from tests.server.lva_server import FIXTURES, LvaServer

IMAGES = [FIXTURES / "images" / name for name in ("rgb_173x97.png", "rgb_80x26.png", "gray_26x80.png")]
TOKENS = 12
LONG = {"format": {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}},
                   "required": ["story"]}, "options": {"temperature": 1.0, "seed": 1}}   # an answer that goes on


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask_ollama(server: LvaServer, image: Path | None, stream: bool) -> str:
    client = ollama.Client(host=server.url)
    message = {"role": "user", "content": "What do you see here?", **({"images": [image]} if image else {})}
    options = {"num_predict": TOKENS, "temperature": 0}
    if stream:
        return "".join(c.message.content for c in client.chat(model="tiny-a", messages=[message], options=options,
                                                              stream=True))
    return client.chat(model="tiny-a", messages=[message], options=options).message.content


def ask_openai(server: LvaServer, image: Path | None, stream: bool) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    content: list[dict] = [{"type": "text", "text": "Describe it, please."}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    arguments = {"model": "tiny-a", "messages": [{"role": "user", "content": content}], "max_tokens": TOKENS,
                 "temperature": 0}
    if stream:
        chunks = client.chat.completions.create(stream=True, **arguments)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(**arguments).choices[0].message.content


REQUESTS = [(ask_ollama, IMAGES[0], True), (ask_ollama, IMAGES[1], False), (ask_openai, IMAGES[2], True),
            (ask_openai, None, False)]


def test_answers_served_together_are_the_answers_served_one_at_a_time(home: Path) -> None:
    with LvaServer(home, "--model", "tiny-a", "--parallel", "1") as alone:
        expected = [ask(alone, image, stream) for ask, image, stream in REQUESTS]
    with LvaServer(home, "--model", "tiny-a", "--parallel", "4") as together:
        start = threading.Barrier(len(REQUESTS))

        def send(request) -> str:
            ask, image, stream = request
            start.wait()
            return ask(together, image, stream)
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            answers = list(pool.map(send, REQUESTS))
        assert answers == expected
        assert sum(bool(answer) for answer in answers) >= 2      # the tiny model may end at once: not all
        assert "4 answers at a time" in together.log()


def test_ps_shows_the_slots_in_use(home: Path) -> None:
    with LvaServer(home, "--model", "tiny-a", "--parallel", "2") as server:
        body = {"model": "tiny-a", "messages": [{"role": "user", "content": "Go on."}], **LONG}
        with httpx.stream("POST", f"{server.url}/api/chat", json=body, timeout=60) as running:
            lines = running.iter_lines()
            for _ in range(20):                        # answering, piece after piece: one slot in use
                next(lines)
            slots = httpx.get(f"{server.url}/api/ps").json()["models"][0]["slots"]
            assert slots == {"total": 2, "in_use": 1}


def test_parallel_zero_is_a_one_line_error_before_loading(home: Path) -> None:
    for arguments, environment in ((["--parallel", "0"], {}), ([], {"OLLAMA_NUM_PARALLEL": "many"})):
        result = run_lva("serve", "--model", "tiny-a", "--port", "0", *arguments,
                         env={"LVA_HOME": str(home), **environment}, timeout=60)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lva: error:") and ("parallel" in lines[0].lower()), lines


def test_a_context_that_does_not_fit_is_a_one_line_error_before_loading(home: Path) -> None:
    result = run_lva("serve", "--model", "tiny-a", "--port", "0", "--parallel", "64", "--ctx", "10000000",
                     env={"LVA_HOME": str(home)}, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "lower --parallel or --ctx" in lines[0], lines
