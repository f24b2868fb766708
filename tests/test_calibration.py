"""Choosing each op's path by measuring it (models/mllama/calibration.py) and keeping the measurements
(assistant/runtime/kernel_choice.py): the fastest path within the bound wins, a slow or inaccurate one never
does, and the kept measurements are used only on the machine and versions that made them."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from assistant.runtime import kernel_choice
from models.kernels.paths import GGML_PRODUCTS, Arithmetic, Isa, KernelPath
from models.mllama import calibration
from models.mllama.calibration import Measurement
from tests.kernel_paths import widest


def measurement(op: str, path: str, seconds: float, error: float = 0.0, bound: float = 1.0) -> Measurement:
    return Measurement(op, KernelPath.parse(path), seconds, 1e9, error, bound)


def test_each_op_runs_its_fastest_path_within_the_bound() -> None:
    found = [measurement("products", "int8@avx512", 0.5, error=0.3, bound=0.02),      # fastest, out of bound
             measurement("products", "int16@avx512", 1.0), measurement("products", "ggml", 2.0),
             measurement("attention", "bf16@avx512_bf16", 3.0), measurement("attention", "f32@avx2", 2.0),
             measurement("mlp_down", "int8@avx512", 0.5), measurement("mlp_down", "int16@avx512", 1.0)]
    paths = calibration.choose(found)
    assert paths.products == KernelPath.parse("int16@avx512")
    assert paths.mlp_down == KernelPath.parse("int8@avx512")            # its own op: within its bound, fastest
    assert paths.attention == KernelPath.parse("f32@avx2")
    assert paths.gelu.isa is None and paths.cross_attention.isa is None      # not measured: ggml's ops


def test_only_arithmetics_within_the_model_bound_are_candidates() -> None:
    """int8 for every product is measured by the benches but never offered (its K/V error is 1.65x HF
    bf16's); int8 for the MLP's down product alone is offered (0.79x)."""
    for op in calibration.OPS:
        assert all(p.arithmetic in calibration.WITHIN_MODEL_BOUND[op] for p in calibration.candidates(op))
    assert all(p.arithmetic is not Arithmetic.INT8 for p in calibration.candidates("products"))
    assert all(p.isa is not Isa.REFERENCE for op in calibration.OPS for p in calibration.candidates(op))
    int8 = widest(Arithmetic.INT8, "mlp_down")
    assert int8 is None or int8 in calibration.candidates("mlp_down")


def test_int8_shows_its_known_error_on_gelus_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLP's down product on GELU's outputs: int8 within its bound on this CPU, as the calibration
    measures it (about 7e-3 against float64; the bound 1.5e-2), and int16 far inside its own."""
    int8 = widest(Arithmetic.INT8, "mlp_down")
    if int8 is None:
        pytest.skip("this CPU runs no int8 product (not run)")
    monkeypatch.setattr(calibration, "TOKENS", 64)
    found = {m.path.arithmetic: m for m in calibration.measure("mlp_down", [int8, widest(Arithmetic.INT16, "mlp_down")],
                                                                threads=2, runs=1)}
    assert all(m.within_bound for m in found.values()), found
    assert 3e-3 < found[Arithmetic.INT8].error and found[Arithmetic.INT16].error < 1e-3


def test_a_slow_path_among_the_candidates_is_never_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "TOKENS", 32)              # the scalar path's share of the work, shorter
    fast = widest(Arithmetic.INT16, "products")
    if fast is None:
        pytest.skip("this CPU runs no SIMD int16 product (not run)")
    slow = KernelPath(Arithmetic.F32, Isa.REFERENCE)              # scalar C: every product one multiply-add at a time
    found = calibration.measure("products", [slow, fast, GGML_PRODUCTS], threads=2, runs=1)
    assert all(m.within_bound for m in found), found             # all are accurate: speed decides
    assert calibration.choose(found).products != slow
    assert max(found, key=lambda m: m.seconds).path == slow


def test_a_path_above_its_bound_on_this_cpu_is_never_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that computed wrongly on some CPU shows an error above its arithmetic's: measured as such, it
    loses to slower paths. Here a bound below what int8 can reach stands in for the broken kernel."""
    fast = widest(Arithmetic.INT8, "products")
    if fast is None:
        pytest.skip("this CPU runs no int8 product (not run)")
    monkeypatch.setitem(calibration.OP_BOUNDS, ("products", Arithmetic.INT8), 1e-6)
    monkeypatch.setattr(calibration, "TOKENS", 32)
    found = calibration.measure("products", [fast, GGML_PRODUCTS], threads=2, runs=1)
    int8 = next(m for m in found if m.path == fast)
    assert not int8.within_bound
    assert calibration.choose(found).products == GGML_PRODUCTS


def fake_measure(calls: list[int]):
    def measure(threads: int, progress) -> list[Measurement]:
        calls.append(threads)
        return [measurement("products", "ggml", 1.0 + len(calls))]
    return measure


def test_the_measurements_are_kept_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(kernel_choice, "_measure", fake_measure(calls))
    cache = tmp_path / "kernel-paths.json"
    first = kernel_choice.measurements(2, cache=cache)
    assert kernel_choice.measurements(2, cache=cache) == first and calls == [2]
    kernel_choice.measurements(1, cache=cache)                    # another thread count: measured again
    assert calls == [2, 1]


@pytest.mark.parametrize("what", ["cpu", "versions"])
def test_another_cpu_or_version_measures_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    calls: list[int] = []
    monkeypatch.setattr(kernel_choice, "_measure", fake_measure(calls))
    cache = tmp_path / "kernel-paths.json"
    kernel_choice.measurements(2, cache=cache)
    kept = json.loads(cache.read_text())
    if what == "cpu":
        kept["key"]["cpu"]["flags"] = kept["key"]["cpu"].get("flags", "") + " avx512_fp16"   # a newer CPU
    else:
        kept["key"]["versions"]["llama-cpp-python"] = "0.3.99"
    cache.write_text(json.dumps(kept))
    kernel_choice.measurements(2, cache=cache)
    assert calls == [2, 2]


def test_a_corrupt_cache_file_is_ignored_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    monkeypatch.setattr(kernel_choice, "_measure", fake_measure(calls))
    cache = tmp_path / "kernel-paths.json"
    cache.write_text('{"key": {"cpu": ')                          # cut short, as by a crash mid-write elsewhere
    with caplog.at_level(logging.WARNING, logger="lva"):
        found = kernel_choice.measurements(2, cache=cache)
    assert calls == [2] and found
    warnings = [r.getMessage() for r in caplog.records if "unreadable kernel measurements" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert json.loads(cache.read_text())["measurements"]            # measured again and kept


def test_the_environment_forces_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(kernel_choice, "_measure", fake_measure(calls))
    cache = tmp_path / "kernel-paths.json"
    paths = kernel_choice.choose(2, environment={"LVA_PRODUCTS": "ggml-bf16", "LVA_ATTENTION": "ggml"}, cache=cache)
    assert str(paths.products) == str(paths.mlp_down) == "ggml-bf16" and str(paths.attention) == "ggml-f16"
    paths = kernel_choice.choose(2, environment={"LVA_PRODUCTS": "ggml-bf16", "LVA_MLP_DOWN": "ggml"}, cache=cache)
    assert str(paths.products) == "ggml-bf16" and str(paths.mlp_down) == "ggml"      # the down product's own wins
    f32 = widest(Arithmetic.F32, "products")
    if f32 is not None:
        forced = kernel_choice.choose(2, environment={"LVA_PRODUCTS": str(f32)}, cache=cache)
        assert forced.products == forced.mlp_down == f32
    with pytest.raises(kernel_choice.KernelError, match="LVA_PRODUCTS=int4"):
        kernel_choice.choose(2, environment={"LVA_PRODUCTS": "int4"}, cache=cache)


def test_a_measurement_survives_its_json() -> None:
    m = measurement("attention", "int16@avx2", 0.25, error=1e-3, bound=2e-3)
    assert Measurement.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert replace(m, error=3e-3).within_bound is False
