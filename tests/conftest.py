"""Shared test fixtures: an isolated LVA_HOME, synthetic checkpoints, and running `lva` as a user does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.synthetic_checkpoint import small_config, write_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--devices", action="store_true",
                     help="collect tests/devices: the runtime on ggml's RPC device (needs the RPC build; "
                          "`make test-devices` builds it and passes this)")
    parser.addoption("--openwebui", metavar="PATH",
                     help="collect tests/openwebui with this `open-webui` command (`make test-openwebui` installs "
                          "Open WebUI and passes it)")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/devices runs only with --devices, in the RPC build's environment, and tests/openwebui only with
    --openwebui; `make test` leaves them out."""
    if collection_path == Path(__file__).parent / "devices" and not config.getoption("--devices"):
        return True
    if collection_path == Path(__file__).parent / "openwebui" and not config.getoption("--openwebui"):
        return True
    return None


@pytest.fixture(autouse=True)
def lva_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own store; nothing touches the real user folders."""
    home = tmp_path / "lva-home"
    monkeypatch.setenv("LVA_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def checkpoint_256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint whose widths are multiples of 256, so every quant type applies."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-256", small_config())


def default_ctrl_c() -> None:
    """`preexec_fn` for a child the test stops with SIGINT: Ctrl-C acts as in a terminal. A shell running the
    tests in the background (`.ci/run &`) ignores SIGINT, children inherit that, and Python then installs no
    KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_lva(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m assistant ARGS` in a subprocess: the real command line, exit code and streams."""
    return subprocess.run([sys.executable, "-m", "assistant", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, **(env or {})}, timeout=timeout)


def pytest_terminal_summary(terminalreporter) -> None:
    """Say which instruction sets of our CPU kernels this CPU runs, so a path never passes unseen by not running."""
    from models.kernels import library
    from models.kernels.paths import Isa

    ran = library.isas()
    missing = [isa for isa in Isa if isa not in ran]
    terminalreporter.write_line(f"lva CPU kernels (attention, GELU, cross-attention, products) run on this CPU in: "
                                f"{', '.join(map(str, ran)) or 'none (not built)'}; "
                                f"not run: {', '.join(map(str, missing)) or 'none'}")
