"""`lva import` of what it cannot use: one line on stderr, a non-zero exit, nothing left in the model store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from convert.pipeline import convert
from tests.conftest import REPO_ROOT, run_lva
from tests.ollama_store import write_model, write_other_model
from tests.test_convert_bad_input import assert_one_line_error

CHECKPOINT = Path(__file__).parent / "fixtures" / "mllama" / "tiny-b" / "checkpoint"


@pytest.fixture(scope="module")
def text_only_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain Llama GGUF, as Ollama stores llama3.2:1b."""
    return convert(str(CHECKPOINT), tmp_path_factory.mktemp("llama"), quant="F16", progress=False).text


def import_from(store: Path, *args: str) -> subprocess.CompletedProcess:
    return run_lva("import", *args, env={"OLLAMA_MODELS": str(store)})


def assert_nothing_written(lva_home: Path) -> None:
    models = lva_home / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_a_store_without_an_mllama_model_says_what_it_holds(tmp_path: Path, lva_home: Path,
                                                            text_only_gguf: Path) -> None:
    write_other_model(tmp_path, "llama3.2:1b", text_only_gguf, ["llama"])
    result = import_from(tmp_path)
    assert_one_line_error(result, "no Llama 3.2 Vision (mllama) model", "llama3.2:1b", "lva pull llama3.2-vision")
    assert_nothing_written(lva_home)


def test_a_text_only_llama_asked_for_by_name_is_refused(tmp_path: Path, lva_home: Path,
                                                        text_only_gguf: Path) -> None:
    write_other_model(tmp_path, "llama3.2:1b", text_only_gguf, ["llama"])
    result = import_from(tmp_path, "llama3.2:1b")
    assert_one_line_error(result, "llama3.2:1b is a text-only Llama", "mllama")
    assert_nothing_written(lva_home)


def test_a_truncated_blob_is_named(tmp_path: Path, lva_home: Path) -> None:
    blob = write_model(tmp_path, CHECKPOINT, "llama3.2-vision:tiny")
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    result = import_from(tmp_path, "llama3.2-vision:tiny")
    assert_one_line_error(result, "is truncated", f"{len(data) // 2} of {len(data)} bytes", "pull the model again")
    assert_nothing_written(lva_home)


def test_a_manifest_naming_a_missing_blob_is_named(tmp_path: Path, lva_home: Path) -> None:
    blob = write_model(tmp_path, CHECKPOINT, "llama3.2-vision:tiny")
    blob.unlink()
    result = import_from(tmp_path, "llama3.2-vision:tiny")
    assert_one_line_error(result, f"names blob {blob.name}, which is missing")
    assert_nothing_written(lva_home)


def test_a_blob_that_is_not_gguf_is_refused(tmp_path: Path, lva_home: Path) -> None:
    blob = write_model(tmp_path, CHECKPOINT, "llama3.2-vision:tiny")
    blob.write_bytes(b"not a gguf file at all".ljust(blob.stat().st_size, b"\0"))   # the size the manifest says
    result = import_from(tmp_path, "llama3.2-vision:tiny")
    assert_one_line_error(result, "is not a readable GGUF file")
    assert_nothing_written(lva_home)


def test_the_legacy_two_blob_format_is_named_with_what_to_do(tmp_path: Path, lva_home: Path) -> None:
    """Ollama v0.4-v0.6 stored llama3.2-vision as a model blob and a projector blob (Ollama's own check since
    v0.7.0, server/routes.go, is exactly this: an mllama family with a projector layer). The blobs' contents do
    not matter to the refusal; any GGUFs stand in for them."""
    current = write_model(tmp_path / "current", CHECKPOINT, "llama3.2-vision:tiny")
    write_other_model(tmp_path, "llama3.2-vision:11b", current, ["mllama"], projector=current)
    listing = import_from(tmp_path)
    assert listing.returncode == 0 and "legacy format" in listing.stdout
    result = import_from(tmp_path, "llama3.2-vision:11b")
    assert_one_line_error(result, "legacy two-file format", "lva pull llama3.2-vision:11b")
    assert_nothing_written(lva_home)


def test_an_unknown_name_and_a_missing_store_say_where_they_looked(tmp_path: Path, lva_home: Path) -> None:
    write_model(tmp_path, CHECKPOINT, "llama3.2-vision:tiny")
    assert_one_line_error(import_from(tmp_path, "llama3.2-vision:90b"), "no Ollama model llama3.2-vision:90b",
                          str(tmp_path), "lva pull llama3.2-vision:90b")
    assert_one_line_error(import_from(tmp_path / "nowhere"), "no Ollama model store at", "OLLAMA_MODELS")
    assert_one_line_error(import_from(tmp_path, "not a name!"), "is not an Ollama model name")
    assert_nothing_written(lva_home)


def test_too_little_disk_space_is_refused_before_writing(tmp_path: Path) -> None:
    """A real 64 KiB tmpfs, mounted in a private user+mount namespace (no root needed)."""
    write_model(tmp_path / "store", CHECKPOINT, "llama3.2-vision:tiny")
    out = tmp_path / "small-disk"
    out.mkdir()
    script = (f'mount -t tmpfs -o size=64k tmpfs {out} && OLLAMA_MODELS={tmp_path / "store"} '
              f'{sys.executable} -m assistant import llama3.2-vision:tiny --out {out}; echo "exit=$?"; ls -A {out}')
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120)
    assert "exit=1" in result.stdout, result.stdout + result.stderr
    assert "not enough disk space" in result.stderr and "GB are free" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "exit=1"       # `ls -A` printed nothing after it


def test_a_full_disk_mid_write_leaves_nothing(tmp_path: Path) -> None:
    """The text file's .part is a link to /dev/full: every write fails with the kernel's ENOSPC."""
    write_model(tmp_path / "store", CHECKPOINT, "llama3.2-vision:tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / "llama3.2-vision-tiny-text-F16.gguf.part").symlink_to("/dev/full")
    result = run_lva("import", "llama3.2-vision:tiny", "--out", str(out), env={"OLLAMA_MODELS": str(tmp_path / "store")})
    assert_one_line_error(result, "no space left on the device", "nothing was kept")
    assert list(out.iterdir()) == []
