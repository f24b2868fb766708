"""The `lva` command as a user meets it: help, the model list, pairs that do not belong together, bad counts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from convert.pipeline import convert
from convert.quant_types import QUANT_TYPES, VISION_TYPES
from tests.conftest import run_lva
from tests.synthetic_checkpoint import small_config, write_checkpoint


def test_convert_help_lists_every_quant_type() -> None:
    result = run_lva("convert", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in [*QUANT_TYPES, *VISION_TYPES]:
        assert name in text
    assert "meta-llama/Llama-3.2-11B-Vision-Instruct" in text


def test_plain_lva_shows_the_commands() -> None:
    result = run_lva()
    assert result.returncode == 0
    assert "convert" in result.stdout and "models" in result.stdout
    assert "lva pull llama3.2-vision" in result.stdout and "import" in result.stdout


def test_models_on_an_empty_store_says_how_to_get_one() -> None:
    result = run_lva("models")
    assert result.returncode == 0
    assert "no models" in result.stdout and "lva convert meta-llama/Llama-3.2-11B-Vision-Instruct" in result.stdout
    assert "lva pull llama3.2-vision" in result.stdout


def test_models_lists_pairs_and_flags_files_from_different_checkpoints(checkpoint_256: Path, lva_home: Path,
                                                                       tmp_path: Path) -> None:
    store = lva_home / "models"
    convert(str(checkpoint_256), store, quant="Q8_0", name="good", progress=False)
    convert(str(checkpoint_256), store, quant="F16", name="mixed", progress=False)
    other = write_checkpoint(tmp_path / "other", small_config(), seed=1)
    stranger = convert(str(other), tmp_path / "other-out", quant="F16", name="mixed", progress=False)
    shutil.copy(stranger.vision, store / "mixed-vision-F16.gguf")
    (store / "good-vision-Q8_0.gguf").unlink()
    for tower in ("text", "vision"):                                   # a download cut short, say
        (store / f"cut-{tower}-F16.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")

    result = run_lva("models")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0] + " " + line.split()[1]: line for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {"good Q8_0", "mixed F16", "cut F16"}
    assert rows["good Q8_0"].endswith("text only")
    assert "NOT a pair" in rows["mixed F16"]
    assert "unreadable: cut-text-F16.gguf is not a readable GGUF file" in rows["cut F16"]


@pytest.mark.parametrize("args, said", [(["ask", "--ctx", "-5", "hi"], "argument --ctx: must be at least 1 (got -5)"),
                                        (["ask", "--threads", "0", "hi"], "argument --threads: must be at least 1"),
                                        (["serve", "--max-tokens", "0"], "argument --max-tokens: must be at least 1"),
                                        (["chat", "--ctx", "x"], "argument --ctx: 'x' is not a whole number")])
def test_counts_below_one_are_refused_in_one_line_before_anything_loads(args: list[str], said: str) -> None:
    result = run_lva(*args)
    assert result.returncode == 2
    assert said in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr
