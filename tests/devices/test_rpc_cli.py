"""`lva rpc-server`, `--rpc`, `--gpu-layers` and `lva info` as a user runs them, against real RPC servers."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from convert.pipeline import convert
from tests.conftest import REPO_ROOT, run_lva
from tests.devices.conftest import free_port, start_server, stop_server
from tests.synthetic_checkpoint import small_config, write_checkpoint

OUT_OF_MEMORY_MARGIN = 48 * 2**20        # what the limited server may allocate past its own start-up


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lva: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_ask_on_the_rpc_device_names_it_and_answers_as_on_the_cpu(fixtures, rpc_server) -> None:
    text = str(fixtures["tiny-a"].text)
    question = ["ask", "--model", text, "--no-history", "--json", "--temperature", "0", "--max-tokens", "8",
                "--image", str(REPO_ROOT / "tests/fixtures/images/rgb_173x97.png"), "Describe it.", "--verbose"]
    remote = run_lva(*question, "--rpc", rpc_server.endpoint)
    split = run_lva(*question, "--rpc", rpc_server.endpoint, "--gpu-layers", "4")
    local = run_lva(*question, "--gpu-layers", "0")
    for result in (remote, split, local):
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["response"] == json.loads(local.stdout)["response"]
    # each a fresh process, where the server's device is RPC0
    assert "lva: running on RPC0\n" in remote.stderr
    assert "lva: running on CPU 1/4 layers + RPC0 3/4 layers\n" in split.stderr
    assert "lva: running on CPU\n" in local.stderr


def test_info_lists_the_rpc_device_and_where_each_part_runs(fixtures, rpc_server) -> None:
    result = run_lva("info", "--rpc", rpc_server.endpoint, "--model", str(fixtures["tiny-a"].text), "--gpu-layers", "4")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^backends: .*\bRPC\b", out, re.M)
    assert re.search(rf"^  RPC0 +RPC server +{re.escape(rpc_server.endpoint)} ", out, re.M)
    assert "llama.cpp offloads to: RPC0\n" in out
    assert "  text layers 0 (1 of 4): CPU\n" in out and "  text layers 1-3 (3 of 4): RPC0\n" in out
    assert "  vision tower (and the K/V projections of the cross layers): RPC0\n" in out
    assert "  cross-attention layer 0 (and its image K/V): CPU\n" in out
    assert "  cross-attention layer 3 (and its image K/V): RPC0\n" in out


def test_an_unreachable_server_is_a_one_line_error(fixtures) -> None:
    result = run_lva("ask", "--model", str(fixtures["tiny-a"].text), "--rpc", f"127.0.0.1:{free_port()}", "hi")
    assert "cannot reach an RPC server at 127.0.0.1:" in one_line_error(result)


def test_a_bad_rpc_address_is_a_one_line_error(fixtures) -> None:
    result = run_lva("ask", "--model", str(fixtures["tiny-a"].text), "--rpc", "gpu-box", "hi")
    assert "write HOST:PORT" in one_line_error(result)


def test_a_device_out_of_memory_suggests_fewer_gpu_layers(tmp_path) -> None:
    """A server whose address space ends a little past its start-up: a real allocation failure on the device."""
    config = small_config(hidden=1024)                       # text layers of 50 MB each at F32
    pair = convert(str(write_checkpoint(tmp_path / "wide", config)), tmp_path / "out", quant="F32", progress=False)
    limit = ("import resource, models.rpc\n"
             "used = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
             f"resource.setrlimit(resource.RLIMIT_AS, (used + {OUT_OF_MEMORY_MARGIN}, resource.RLIM_INFINITY))")
    server = start_server(None, python_prelude=limit)
    try:
        ask = ["ask", "--model", str(pair.text), "--rpc", server.endpoint, "--no-history", "--max-tokens", "2", "hi"]
        error = one_line_error(run_lva(*ask))
        assert f"failed to allocate RPC0[{server.endpoint}] buffer" in error
        assert error.endswith("try a smaller --gpu-layers (now all; 0 runs everything on the CPU)")
        fewer = run_lva(*ask, "--gpu-layers", "1")              # only the output layer goes to the device
        assert fewer.returncode == 0, fewer.stderr
    finally:
        said = stop_server(server)
    assert "failed to allocate buffer" in said                   # the server refused, and kept serving



def test_rpc_server_warns_when_it_listens_beyond_the_loopback() -> None:
    quiet = stop_server(start_server())
    assert "lva: lending CPU" in quiet and "WARNING" not in quiet
    loud = stop_server(start_server(None, "--host", "0.0.0.0"))
    assert "lva: WARNING: listening on 0.0.0.0, not the loopback: ggml's RPC protocol has no authentication" in loud


def test_rpc_server_refuses_an_unknown_device_and_a_busy_port(rpc_server) -> None:
    unknown = run_lva("rpc-server", "--port", str(free_port()), "--device", "CUDA7")
    assert "no device named 'CUDA7' here (devices: CPU" in one_line_error(unknown)
    busy = subprocess.run([sys.executable, "-m", "assistant", "rpc-server", "--port",
                           rpc_server.endpoint.rsplit(":", 1)[1]], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=60)
    assert busy.returncode == 1
    assert f"lva: error: could not listen on {rpc_server.endpoint}" in busy.stderr
