"""A real non-host device for the runtime: ggml RPC servers started by `lva rpc-server` in subprocesses.

Each server lends this machine's CPU over a socket on 127.0.0.1, so every weight, activation and image K/V
placed on it lives in another process and every tensor get and set crosses the socket, as over PCIe on a
GPU. These tests need llama-cpp-python built with the RPC backend (`make test-devices` builds it); in any
other build they fail, saying so: they never skip.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "fixtures"
SERVER_THREADS = 1                   # the client's threads share this machine's cores
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RpcServer:
    """A running `lva rpc-server` and the device it lends, as this process's ggml names it once added."""

    endpoint: str
    process: subprocess.Popen
    stderr: Path                     # a file, not a pipe: a server must never block on a full pipe

    @property
    def device(self) -> str:
        from models import rpc

        return rpc.add_server(self.endpoint)[0].name


def start_server(port: int | None = None, *args: str, python_prelude: str = "") -> RpcServer:
    """`python -m assistant rpc-server` on 127.0.0.1; returns once it answers ggml's hello.

    `python_prelude` runs first in the server's interpreter (a memory limit, for the out-of-memory test).
    """
    from models import rpc

    port = port or free_port()
    command = [sys.executable, "-c", f"{python_prelude}\nimport sys\nfrom assistant.cli import main\n"
                                     f"sys.exit(main(sys.argv[1:]))",
               "rpc-server", "--port", str(port), "--threads", str(SERVER_THREADS), *args]
    stderr = Path(tempfile.mkstemp(prefix="lva-rpc-server-", suffix=".log")[1])
    with stderr.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log,
                                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            rpc.hello("127.0.0.1", port, timeout=5)
            return RpcServer(f"127.0.0.1:{port}", process, stderr)
        except rpc.RpcError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"lva rpc-server did not start: {stderr.read_text()}") from None
            time.sleep(0.1)


def stop_server(server: RpcServer) -> str:
    """Stop it; returns what it wrote on stderr."""
    server.process.terminate()
    server.process.wait(timeout=30)
    said = server.stderr.read_text()
    server.stderr.unlink(missing_ok=True)
    return said


@pytest.fixture(scope="session", autouse=True)
def rpc_build() -> None:
    """Every test here fails, saying why, in a build without ggml's RPC backend."""
    from models import rpc

    try:
        rpc.require()
    except rpc.RpcError as exc:
        pytest.fail(f"tests/devices needs the RPC build of llama-cpp-python (run `make test-devices`): {exc}",
                    pytrace=False)


@pytest.fixture(scope="session")
def rpc_server(rpc_build) -> Iterator[RpcServer]:
    """One server for the whole session: ggml keeps a connection per server until the process ends."""
    server = start_server()
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def second_rpc_server(rpc_server) -> Iterator[RpcServer]:
    server = start_server()
    yield server
    stop_server(server)


@dataclass
class Fixture:
    """A golden fixture config converted at F32, with its reference."""

    name: str
    text: Path
    vision: Path
    reference: dict
    expected: dict

    def cases(self, with_image: bool | None = None) -> list[dict]:
        return [c for c in self.reference["cases"] if with_image is None or (c["image"] is not None) == with_image]


def image_path(case: dict) -> Path | None:
    return None if case["image"] is None else FIXTURES / "images" / case["image"]


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Fixture]:
    import numpy as np

    from convert.pipeline import convert

    found = {}
    for directory in sorted((FIXTURES / "mllama").iterdir()):
        reference = json.loads((directory / "reference.json").read_text())
        pair = convert(str(directory / reference["checkpoint"]), tmp_path_factory.mktemp(directory.name),
                       quant="F32", progress=False)
        with np.load(directory / "reference.npz") as arrays:
            expected = {key: arrays[key] for key in arrays.files}
        found[directory.name] = Fixture(directory.name, pair.text, pair.vision, reference, expected)
    return found
