"""Server benchmark: the same request through `lva serve`'s /v1/chat/completions and through the Python API.

The Python side renders the chat template, tokenizes and calls `generate` on a model from `load_model`; the
server side is `python -m assistant serve` in a child process, asked over HTTP by one httpx client with a
kept-alive connection (the same messages, the image as a base64 data: URL). Both run greedy on the same
threads, one after the other, so the answers are the same tokens. The difference is what the server adds:

- per request: max_tokens 1, the same request repeated, so the KV cache leaves one prompt token to evaluate
  (HTTP, JSON, the queue, the template and, with an image, decoding the base64 image and checking it; the
  Python API too opens the image on every call, to find its features in the cache);
- per token: max_tokens N streamed as server-sent events, read event by event, against `generate`'s pieces;
  (server(N) - server(1) - (python(N) - python(1))) / (N - 1).

It uses the tiny test model (tests/fixtures/mllama/tiny-a, converted to F32), whose tokens cost well under
a millisecond, so the server's own costs are not hidden by the model's; on one thread per side by default,
which also leaves the server's event loop a core of its own on a 2-core machine.

    python bench/server_bench.py                 # print the table
    python bench/server_bench.py --write-docs    # and rewrite the server section of docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import re
import subprocess
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, write_section  # noqa: E402

from assistant import load_model  # noqa: E402
from assistant.chat.template import ChatTemplate, TemplateMessage  # noqa: E402
from convert.pipeline import convert  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
IMAGE = FIXTURES / "images" / "rgb_173x97.png"
TEXT = "Describe the image."
PREAMBLE = ("## Serving (`lva serve`)\n\n"
            "What the server adds to a request and to each streamed token, against the Python API on the same model "
            "(`load_model` + `generate`). To rerun: `python bench/server_bench.py --write-docs`.")


@dataclass
class Case:
    label: str
    image: Path | None
    max_tokens: int
    stream: bool


@dataclass
class Row:
    case: Case
    python_ms: list[float]          # one per round
    server_ms: list[float]

    def best(self) -> tuple[float, float]:
        return min(self.python_ms), min(self.server_ms)

    def median(self) -> tuple[float, float]:
        return statistics.median(self.python_ms), statistics.median(self.server_ms)


class PythonApi:
    def __init__(self, text_gguf: Path, threads: int) -> None:
        self.model = load_model(text_gguf, n_ctx=4096, n_threads=threads)
        self.template = ChatTemplate(self.model.chat_template, self.model.special_token_text(self.model.bos_token))

    def ask(self, case: Case) -> int:
        prompt = self.template.render([TemplateMessage("user", TEXT, has_image=case.image is not None)])
        tokens = []
        for _ in self.model.generate(self.model.tokenize(prompt), image=case.image, max_tokens=case.max_tokens,
                                     temperature=0.0, on_token=tokens.append):
            pass
        return len(tokens)


class Server:
    def __init__(self, text_gguf: Path, threads: int, home: Path) -> None:
        self.log = home / "serve.log"
        env = {**os.environ, "LVA_HOME": str(home)}
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "assistant", "serve", "--port", "0", "--model",
                                             str(text_gguf), "--threads", str(threads)], cwd=REPO, env=env,
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (match := re.search(r"listening on (http://\S+) ", self.log.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lva serve did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.client = httpx.Client(base_url=match[1], timeout=120)
        self.images: dict[Path, str] = {}

    def ask(self, case: Case) -> int:
        content = [{"type": "text", "text": TEXT}]
        if case.image is not None:
            content.append({"type": "image_url", "image_url": {"url": self._data_url(case.image)}})
        body = {"model": "", "messages": [{"role": "user", "content": content}], "max_tokens": case.max_tokens,
                "temperature": 0, "stream": case.stream}
        if not case.stream:
            response = self.client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]
        body["stream_options"] = {"include_usage": True}
        usage = None
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
        return usage["completion_tokens"]

    def _data_url(self, image: Path) -> str:
        if image not in self.images:
            kind = "jpeg" if image.suffix == ".jpg" else "png"
            self.images[image] = f"data:image/{kind};base64," + base64.b64encode(image.read_bytes()).decode()
        return self.images[image]

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def make_photo(path: Path) -> Path:
    """A 1600×1200 JPEG with a photo's size on disk (smooth shapes and some noise)."""
    y, x = np.mgrid[0:1200, 0:1600].astype(np.float32)
    noise = np.random.default_rng(1).normal(0, 12, (1200, 1600, 3))
    pixels = np.stack([128 + 100 * np.sin(x / 97), 128 + 100 * np.cos(y / 61), 128 + 90 * np.sin((x + y) / 143)], -1)
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)
    return path


def timed(ask, case: Case) -> tuple[float, int]:
    time.sleep(0.1)         # the other side's threads have gone to sleep: they spin for a while after their work
    start = time.perf_counter()
    tokens = ask(case)
    return (time.perf_counter() - start) * 1000, tokens


def measure(python: PythonApi, server: Server, cases: list[Case], rounds: int) -> list[Row]:
    """`rounds` of each case, the two sides interleaved (taking turns at going first) so that a slow stretch
    of the shared machine hits both."""
    for case in cases:                                   # warm-up: load, encode the image once per side
        python.ask(case), server.ask(case)
    rows = []
    for case in cases:
        row, counts = Row(case, [], []), set()
        for round_ in range(rounds):
            sides = [(python.ask, row.python_ms), (server.ask, row.server_ms)]
            for ask, times in sides if round_ % 2 == 0 else sides[::-1]:
                ms, tokens = timed(ask, case)
                times.append(ms)
                counts.add(tokens)
        if counts != {case.max_tokens}:
            raise RuntimeError(f"{case.label}: answers of {sorted(counts)} tokens, not {case.max_tokens} (the greedy "
                               "answer ended early; choose another prompt)")
        rows.append(row)
        print(f"{case.label}: best Python {row.best()[0]:.2f} ms, server {row.best()[1]:.2f} ms", flush=True)
    return rows


def render(rows: list[Row], threads: int, rounds: int) -> str:
    by_label = {row.case.label: row for row in rows}
    short, long = by_label["1 token, image, streamed"], by_label["many tokens, image, streamed"]
    n = long.case.max_tokens

    def per_token(statistic: str) -> tuple[float, float]:
        (python_1, server_1), (python_n, server_n) = getattr(short, statistic)(), getattr(long, statistic)()
        return (python_n - python_1) / (n - 1), (server_n - server_1) / (n - 1)

    lines = [
        f"Measured {datetime.date.today()} by `python bench/server_bench.py --write-docs` on {machine()}, "
        f"{threads} thread{'s' if threads != 1 else ''} per side; the tiny test model (tiny-a, F32: 4 self-attention "
        f"+ 3 cross-attention "
        f"layers of width 80), greedy; *image* is the 173×97 PNG of the tests, the JPEG a generated photo-sized one "
        f"(both encoded once, in the warm-up, on both sides); the best of {rounds} interleaved rounds, and the "
        "difference of the medians. The machine is shared with other work, so timings are noisy; compare the columns "
        "of a row rather than digits across runs.",
        "",
        "| request | Python API ms | /v1/chat/completions ms | server overhead ms | overhead, medians ms |",
        "|---|--:|--:|--:|--:|",
    ]
    for row in rows:
        (python_best, server_best), (python_median, server_median) = row.best(), row.median()
        lines.append(f"| {row.case.label.replace('many', str(n))} | {python_best:.2f} | {server_best:.2f} | "
                     f"{server_best - python_best:.2f} | {server_median - python_median:.2f} |")
    (python_best, server_best), (python_median, server_median) = per_token("best"), per_token("median")
    lines += [
        "",
        f"Per streamed token (the {n}-token row less the 1-token row, over {n - 1} tokens): Python "
        f"{python_best:.3f} ms, server {server_best:.3f} ms from the best rounds, so the server adds "
        f"{server_best - python_best:.3f} ms per token ({server_median - python_median:.3f} ms from the medians): "
        "one server-sent event, its JSON, and the hop from the worker thread to the event loop.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of each side (default 1: the tiny model's graphs are too small to share, and "
                             "two threads on a busy 2-core machine mostly wait for each other)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=256, help="answer length of the per-token rows")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lva-server-bench-"))
    pair = convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), work / "models", quant="F32", name="tiny-a",
                   progress=False)
    photo = make_photo(work / "photo.jpg")
    cases = [Case("1 token, text only, whole", None, 1, False), Case("1 token, image, whole", IMAGE, 1, False),
             Case(f"1 token, {photo.stat().st_size // 1000} kB 1600×1200 JPEG, whole", photo, 1, False),
             Case("1 token, image, streamed", IMAGE, 1, True),
             Case("many tokens, image, streamed", IMAGE, args.tokens, True)]
    python, server = PythonApi(pair.text, args.threads), Server(pair.text, args.threads, work)
    try:
        rows = measure(python, server, cases, args.rounds)
    finally:
        server.close()
        python.model.close()
    report = render(rows, args.threads, args.rounds)
    print(report)
    if args.write_docs:
        write_section("server", report, PREAMBLE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
