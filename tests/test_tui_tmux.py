"""The chat app in a real terminal: tmux runs `lva chat`, types, pastes an image path, restarts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assistant import store
from assistant.history import History
from convert.pipeline import convert
from assistant.cli import BUG, EXIT_BUG
from tests.conftest import REPO_ROOT
from tests.planted_bug import MESSAGE, TRIGGER

IMAGE = Path(__file__).parent / "fixtures" / "images" / "rgb_173x97.png"
SOCKET = f"lva-test-{os.getpid()}"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True, check=True).stdout


def screen() -> str:
    return tmux("capture-pane", "-p", "-t", "app")


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; the screen was:\n{screen()}")


def start_app(lva_home: Path, module: str = "assistant", after: str = "") -> None:
    """`python -m MODULE chat` in tmux (`tests.planted_bug`: lva with a bug planted); `after` is shell after it."""
    command = f"cd {REPO_ROOT} && LVA_HOME={lva_home} PYTHONPATH={REPO_ROOT} {sys.executable} -m {module} chat{after}"
    tmux("new-session", "-d", "-s", "app", "-x", "120", "-y", "36", command)
    wait_for(lambda: "context" in screen(), "the app to start")


def answers(lva_home: Path) -> list:
    with History(lva_home / "history.sqlite3") as history:
        last = history.last_conversation()
        return [] if last is None else [m for m in history.messages(last.id) if m.role == "assistant"]


@pytest.fixture()
def terminal(lva_home: Path):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed for the end-to-end test (.ci/run installs it)")
    convert(str(Path(__file__).parent / "fixtures" / "mllama" / "tiny-a" / "checkpoint"), store.models_dir(),
            quant="F32", name="tiny-a", progress=False)
    yield
    subprocess.run(["tmux", "-L", SOCKET, "kill-server"], capture_output=True)


def test_the_app_answers_takes_a_pasted_image_and_remembers_after_a_restart(terminal, lva_home: Path) -> None:
    start_app(lva_home)
    tmux("send-keys", "-t", "app", "Hello there", "Enter")
    wait_for(lambda: len(answers(lva_home)) == 1 and answers(lva_home)[0].status == "complete", "the first answer")
    tmux("set-buffer", f"'{IMAGE}'")
    tmux("paste-buffer", "-p", "-t", "app")                    # a bracketed paste, as dropping a file does
    wait_for(lambda: IMAGE.name in screen(), "the attached image")
    tmux("send-keys", "-t", "app", "What is in it?", "Enter")
    wait_for(lambda: len(answers(lva_home)) == 2 and answers(lva_home)[1].status == "complete", "the second answer")
    tmux("send-keys", "-t", "app", "C-q")
    wait_for(lambda: not _has_sessions(), "the app to quit", timeout=20)

    start_app(lva_home)
    # The sidebar has the conversation; the chat its last turn with the image (now the history's own copy).
    wait_for(lambda: "Hello there" in screen() and "What is in it?" in screen() and "🖼" in screen(),
             "the conversation and its image after the restart")


def test_a_bug_ends_the_app_with_its_traceback_and_a_line_saying_it_is_one(terminal, lva_home: Path) -> None:
    start_app(lva_home, "tests.planted_bug", '; echo "lva exited with $?"; sleep 120')
    tmux("send-keys", "-t", "app", f"Please {TRIGGER}.", "Enter")
    wait_for(lambda: "lva exited with" in screen(), "the app to end")
    shown = tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "app")        # with what scrolled off the screen
    assert "Traceback" in shown and f"RuntimeError: {MESSAGE}" in shown
    assert f"{BUG}\nlva exited with {EXIT_BUG}" in shown


def _has_sessions() -> bool:
    return subprocess.run(["tmux", "-L", SOCKET, "has-session"], capture_output=True).returncode == 0
