"""`lva serve` as a user starts it: a real process on a free port of 127.0.0.1, its log in a file.

    with LvaServer(home, "--model", "tiny-a") as server:
        ollama.Client(host=server.url).chat(...)
        server.log_line("POST /api/chat")          # the request log, one line per request

`home` is the server's LVA_HOME: its model store (tests convert a tiny model into `home/models`) and its
on-disk image-feature cache.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from convert.pipeline import convert
from tests.conftest import REPO_ROOT, default_ctrl_c

FIXTURES = REPO_ROOT / "tests" / "fixtures"
START_SECONDS = 60


def store_with_tiny_model(home: Path) -> Path:
    """`home` with tiny-a (F32) converted into its model store, served as `tiny-a-F32` (or `tiny-a`)."""
    convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), home / "models", quant="F32", name="tiny-a",
            progress=False)
    return home


class LvaServer:
    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None, module: str = "assistant") -> None:
        """`module`: what `python -m` runs (`tests.planted_bug` is `lva` with bugs planted in it)."""
        self.home = home
        self.args = args
        self.module = module
        self.env = {**os.environ, "LVA_HOME": str(home), **(env or {})}
        self.log_path = home / f"serve-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> LvaServer:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", self.module, "serve", "--port", "0", *self.args],
                                            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=default_ctrl_c)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if match := re.search(r"listening on (http://\S+) ", self.log()):
                self.url = match[1]
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"lva serve exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"lva serve did not start in {START_SECONDS} s:\n{self.log()}")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Ctrl-C, as a user stops it; killed if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text()

    def log_lines(self, containing: str) -> list[str]:
        return [line for line in self.log().splitlines() if containing in line]

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 60) -> list[re.Match]:
        """The first `count` log lines matching `pattern` (a regex), once there are that many."""
        deadline = time.monotonic() + timeout
        while True:
            matches = [m for line in self.log().splitlines() if (m := re.search(pattern, line))]
            if len(matches) >= count:
                return matches[:count]
            if time.monotonic() > deadline or (self.process and self.process.poll() is not None):
                raise AssertionError(f"no {count} log lines match {pattern!r}:\n{self.log()}")
            time.sleep(0.05)
