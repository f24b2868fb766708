"""Saying where lva runs, in this (CPU) build: `lva info`, --gpu-layers, and RPC asked of a build without it.

The runtime on a non-host device is tested in tests/devices/ (`make test-devices`, the RPC build).
"""

from __future__ import annotations

import re
from pathlib import Path

import llama_cpp
import pytest

from assistant import load_model
from assistant.cli import build_parser
from convert.pipeline import convert
from tests.conftest import run_lva

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_a_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    pair = convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), tmp_path_factory.mktemp("tiny-a"),
                   quant="F32", progress=False)
    return str(pair.text)


def test_info_shows_the_build_and_the_cpu() -> None:
    result = run_lva("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"lva 0.1.0, llama-cpp-python {llama_cpp.__version__}\n")
    assert "backends: CPU\n" in out
    cpu_features = next(line for line in out.splitlines() if line.startswith("  CPU: "))
    assert cpu_features.split()[1:] == [f for f in re.findall(r"(\w+) = 1", llama_cpp.llama_print_system_info()
                                                              .decode())]
    assert re.search(r"^  CPU +CPU +.+ \(\d+\.\d of \d+\.\d GiB free\)$", out, re.M)
    assert "llama.cpp offloads to: nothing (CPU only)\n" in out


def test_info_with_a_model_shows_where_each_part_runs(tiny_a_text: str) -> None:
    result = run_lva("info", "--model", tiny_a_text)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(
        "checkpoint-text-F32.gguf with --gpu-layers all:\n"
        "  text layers 0-3 (4 of 4): CPU\n"
        "  output layer: CPU    token embeddings: CPU\n"
        "  vision tower (and the K/V projections of the cross layers): CPU\n"
        "  cross-attention layer 0 (and its image K/V): CPU\n"
        "  cross-attention layer 3 (and its image K/V): CPU\n"
        "  cross-attention layer 4 (and its image K/V): CPU\n")


def test_the_placement_comes_from_llama_cpp_and_names_the_cpu(tiny_a_text: str) -> None:
    for n_gpu_layers in (-1, 0, 3):                        # nothing to offload to in a CPU build
        model = load_model(tiny_a_text, n_ctx=256, n_gpu_layers=n_gpu_layers)
        try:
            assert model.placement.text_layers == ("CPU",) * 4
            assert model.placement.cross_layers == {0: "CPU", 3: "CPU", 4: "CPU"}
            assert model.placement.summary() == "CPU"
            assert model.vision_backend.is_cpu and model.offload_devices == []
        finally:
            model.close()


def test_ask_verbose_names_the_device(tiny_a_text: str) -> None:
    result = run_lva("ask", "--model", tiny_a_text, "--no-history", "--max-tokens", "2", "--verbose", "hi")
    assert result.returncode == 0, result.stderr
    assert "lva: running on CPU\n" in result.stderr


@pytest.mark.parametrize("command", ["ask", "batch", "chat", "info"])
def test_every_model_running_command_takes_the_device_options(command: str) -> None:
    positional = {"ask": ["hi"], "batch": ["in.jsonl", "--out", "out.jsonl"]}.get(command, [])
    args = build_parser().parse_args([command, *positional, "--gpu-layers", "12", "--rpc", "a:1,b:2"])
    assert args.gpu_layers == 12 and args.rpc == "a:1,b:2"


def test_rpc_in_a_build_without_it_says_how_to_rebuild(tiny_a_text: str) -> None:
    hint = 'built without ggml\'s RPC backend; rebuild it with CMAKE_ARGS="-DGGML_RPC=on"'
    for result in (run_lva("rpc-server"), run_lva("ask", "--model", tiny_a_text, "--rpc", "127.0.0.1:50052", "hi")):
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("lva: error: ") and hint in result.stderr
