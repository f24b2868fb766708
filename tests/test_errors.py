"""Errors as `lva` shows them: a user's error (an `LvaError`) is one line and its exit code; a bug is its traceback
and one line saying it is a bug to report. The bug is planted in the real command by `tests.planted_bug`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from assistant.chat.engine import ChatError, ContextOverflow
from assistant.cli import EXIT_BUG
from assistant.history import HistoryError
from assistant.images import ImageError
from assistant.runtime import ModelError
from assistant.server.inputs import ApiError
from assistant.server.worker import LoadError
from assistant.store import ModelNotFound
from convert.errors import ConvertError
from convert.ollama.store import OllamaError
from models.errors import LvaError
from models.gguf_tensors import GGUFError
from models.mllama.hparams import HParamsError
from models.rpc import RpcError
from tests.conftest import REPO_ROOT, run_lva
from tests.planted_bug import MESSAGE, TRIGGER

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from convert.pipeline import convert

    pair = convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), tmp_path_factory.mktemp("models"),
                   quant="F32", name="tiny-a", progress=False)
    return str(pair.text)


def test_every_kind_of_user_error_is_an_lva_error_and_none_is_a_value_error() -> None:
    kinds = [ChatError, ContextOverflow, HistoryError, ImageError, ModelError, ApiError, LoadError, ModelNotFound,
             ConvertError, OllamaError, GGUFError, HParamsError, RpcError]
    assert all(issubclass(kind, LvaError) and not issubclass(kind, ValueError) for kind in kinds)


def test_a_user_error_is_one_line_and_its_exit_code(model_path: str) -> None:
    result = run_lva("ask", "--model", model_path, "--image", str(FIXTURES / "mllama"), "What is it?")
    assert result.returncode == ImageError.exit_code == 1
    assert result.stderr == f"lva: error: {FIXTURES / 'mllama'}: is a directory, not an image\n"


def test_a_bug_shows_its_traceback_and_says_it_is_one(model_path: str) -> None:
    result = subprocess.run([sys.executable, "-m", "tests.planted_bug", "ask", "--model", model_path, "--no-history",
                             "--max-tokens", "4", f"Please {TRIGGER}."], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=300)
    assert result.returncode == EXIT_BUG
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and f"RuntimeError: {MESSAGE}" in lines
    assert any("_first_piece_then_a_bug" in line for line in lines)
    assert lines[-1] == "lva: this is a bug in lva, not something you did; please report it with the traceback above"


def test_the_planted_bug_leaves_other_answers_alone(model_path: str) -> None:
    result = subprocess.run([sys.executable, "-m", "tests.planted_bug", "ask", "--model", model_path, "--no-history",
                             "--max-tokens", "4", "Hello"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr and result.stdout.strip()
