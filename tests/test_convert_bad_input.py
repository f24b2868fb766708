"""Bad input gets one line on stderr, a non-zero exit, and leaves no output behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, default_ctrl_c, run_lva
from tests.synthetic_checkpoint import small_config, write_checkpoint


def broken_copy(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(checkpoint, copy)
    return copy


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lva: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []


def convert_into(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_lva("convert", str(source), "--out", str(out), "--quant", "F16", *extra)


def test_another_model_type_says_what_is_supported(checkpoint_256: Path, tmp_path: Path) -> None:
    source = broken_copy(checkpoint_256, tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    result = convert_into(source, tmp_path / "out")
    assert_one_line_error(result, "'llava'", "Llama 3.2 Vision", "mllama")
    assert_nothing_written(tmp_path / "out")


def test_missing_shard_is_named(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "sharded", small_config(), shard_bytes=400_000)
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    result = convert_into(source, tmp_path / "out")
    assert_one_line_error(result, "missing shard", shards[1].name)
    assert_nothing_written(tmp_path / "out")


def test_truncated_safetensors_is_refused(checkpoint_256: Path, tmp_path: Path) -> None:
    source = broken_copy(checkpoint_256, tmp_path)
    weights = source / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    result = convert_into(source, tmp_path / "out")
    assert_one_line_error(result, "model.safetensors is truncated")
    assert_nothing_written(tmp_path / "out")


def test_corrupt_safetensors_header_is_refused(checkpoint_256: Path, tmp_path: Path) -> None:
    source = broken_copy(checkpoint_256, tmp_path)
    with open(source / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    result = convert_into(source, tmp_path / "out")
    assert_one_line_error(result, "model.safetensors is corrupt")
    assert_nothing_written(tmp_path / "out")


def test_corrupt_tensor_values_are_refused_and_leave_no_file(checkpoint_256: Path, tmp_path: Path) -> None:
    source = broken_copy(checkpoint_256, tmp_path)
    header_length = int.from_bytes((source / "model.safetensors").read_bytes()[:8], "little")
    with open(source / "model.safetensors", "r+b") as f:     # bf16 0xFFFF is a NaN, in the first tensor
        f.seek(8 + header_length)
        f.write(b"\xff\xff" * 64)
    result = convert_into(source, tmp_path / "out")
    assert_one_line_error(result, "NaN")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("missing", ["tokenizer.json", "config.json", "preprocessor_config.json"])
def test_missing_file_is_named(missing: str, checkpoint_256: Path, tmp_path: Path) -> None:
    source = broken_copy(checkpoint_256, tmp_path)
    (source / missing).unlink()
    result = convert_into(source, tmp_path / "out")
    assert_one_line_error(result, f"has no {missing}")
    assert_nothing_written(tmp_path / "out")


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    config = small_config()
    source = write_checkpoint(tmp_path / "ckpt", config)
    config["text_config"]["num_hidden_layers"] = 5                 # the config now promises a layer not there
    (source / "config.json").write_text(json.dumps(config))
    result = convert_into(source, tmp_path / "out")
    assert_one_line_error(result, "lacks tensor language_model.model.layers.4.")
    assert_nothing_written(tmp_path / "out")


def test_unknown_quant_type_lists_the_valid_ones(checkpoint_256: Path, tmp_path: Path) -> None:
    result = run_lva("convert", str(checkpoint_256), "--out", str(tmp_path / "out"), "--quant", "Q3_X")
    assert_one_line_error(result, "unknown quant type 'Q3_X'", "F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M")
    assert_nothing_written(tmp_path / "out")


def test_not_a_directory_nor_a_repo_id(tmp_path: Path) -> None:
    result = convert_into(tmp_path / "nowhere" / "at" / "all", tmp_path / "out")
    assert_one_line_error(result, "neither a checkpoint directory nor a Hugging Face repo id")


def test_existing_outputs_are_refused_unless_forced(checkpoint_256: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "tiny-256-text-F16.gguf"
    existing.write_bytes(b"a model the user cares about")
    result = convert_into(checkpoint_256, out)
    assert_one_line_error(result, "tiny-256-text-F16.gguf already exists", "--force")
    assert existing.read_bytes() == b"a model the user cares about"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-256-text-F16.gguf"]

    forced = convert_into(checkpoint_256, out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert existing.read_bytes()[:4] == b"GGUF"


def test_too_little_disk_space_is_refused_before_writing(checkpoint_256: Path, tmp_path: Path) -> None:
    """A real 1 MiB tmpfs, mounted in a private user+mount namespace (no root needed)."""
    out = tmp_path / "small-disk"
    out.mkdir()
    script = (f'mount -t tmpfs -o size=1m tmpfs {out} && '
              f'{sys.executable} -m assistant convert {checkpoint_256} --out {out} --quant F16; '
              f'echo "exit=$?"; ls -A {out}')
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120)
    assert "exit=1" in result.stdout, result.stdout + result.stderr
    assert "not enough disk space" in result.stderr and "GB are free" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "exit=1"       # `ls -A` printed nothing after it


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_a_full_disk_mid_write_leaves_nothing(quant: str, checkpoint_256: Path, tmp_path: Path) -> None:
    """The text file's .part is a link to /dev/full: every write fails with the kernel's ENOSPC."""
    out = tmp_path / "out"
    out.mkdir()
    target = f".tiny-256-text-{quant}-unquantized.gguf.part" if quant != "F16" else f"tiny-256-text-{quant}.gguf.part"
    (out / target).symlink_to("/dev/full")
    result = run_lva("convert", str(checkpoint_256), "--out", str(out), "--quant", quant)
    assert_one_line_error(result, "no space left on the device", "nothing was kept")
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def larger_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough (~150 MB) that a conversion is still writing for a while after its first .part appears."""
    return write_checkpoint(tmp_path_factory.mktemp("large") / "larger", small_config(hidden=1024, vocab_size=16384))


def convert_stopped_mid_write(source: Path, out: Path, attempts: int = 5) -> subprocess.Popen:
    """A conversion frozen (SIGSTOP) while a .part file is being written, so a signal sent next lands mid-write
    whatever the machine's speed. A conversion that finished between seeing its .part and the stop is run
    again in a fresh folder (a fast machine can do that): the caller sends its signal, then SIGCONT."""
    for _ in range(attempts):
        shutil.rmtree(out, ignore_errors=True)
        process = subprocess.Popen([sys.executable, "-m", "assistant", "convert", str(source), "--out", str(out),
                                    "--quant", "F32"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, preexec_fn=default_ctrl_c)
        while not list(out.glob("*.part")) and process.poll() is None:
            pass                                              # no sleep: the window is short on a fast machine
        process.send_signal(signal.SIGSTOP)
        if process.poll() is None and list(out.glob("*.part")):
            return process
        process.send_signal(signal.SIGCONT)
        process.communicate(timeout=60)
    raise AssertionError(f"the conversion always finished before it could be stopped ({attempts} tries)")


@pytest.mark.slow
def test_ctrl_c_mid_write_removes_the_partial_files(larger_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = convert_stopped_mid_write(larger_checkpoint, out)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "lva: interrupted; nothing was kept"
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_a_kill_mid_write_leaves_no_file_that_looks_complete(larger_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = convert_stopped_mid_write(larger_checkpoint, out)
    process.kill()
    process.communicate(timeout=60)
    left = [p.name for p in out.iterdir()]
    assert left and all(name.endswith(".part") for name in left)
    assert list(out.glob("*.gguf")) == []
