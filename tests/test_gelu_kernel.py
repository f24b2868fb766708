"""Our GELU kernel (models/kernels/gelu.c, `lva_gelu`) against the exact erf GELU in float64.

The encoder's MLP computes gelu(ffn_up x + bias) with it beside our attention kernel. Inputs: a grid over
[-12, 12], normal values, and the edges (0, -0, the ±4√2 where erf's approximation is clamped, ±1e4,
tiny values), in rows of 53 values (whole AVX-512 and AVX2 vectors and a tail), with and without a bias.
Measured on the development machine (AMD EPYC with AVX-512 BF16, 2026-11-29), every instruction set is within
2.47e-7 × max(1, |x|) of the exact (ggml's own erf GELU, libm's erff: 1.0e-7); the bound is 1.5x that.
ggml's tabulated tanh form, which the encoder used before, is 1.0e-3 off by the same measure.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from models import ggml
from models.ggml import F32, Graph
from models.kernels import ops
from models.kernels.paths import Arithmetic, Isa, KernelPath
from tests.kernel_paths import F32 as PATHS, require

BOUND = 3.7e-7
ROW = 53
THREADS = (1, 2, 3)


def run_gelu(path: KernelPath, x: np.ndarray, bias: np.ndarray | None, threads: int) -> np.ndarray:
    backend = ggml.Backend(threads)
    scratch, g = ggml.Scratch(backend), Graph()
    try:
        x_in = g.input(F32, x.shape[1], x.shape[0], name="x")
        bias_in = None if bias is None else g.input(F32, bias.shape[0], name="bias")
        out = g.output(ops.gelu(g, x_in, path, bias_in))
        inputs = {x_in: x} if bias is None else {x_in: x, bias_in: bias}
        scratch.run(g, inputs)
        return ggml.tensor_get(out)
    finally:
        g.close()
        scratch.close()
        backend.close()


def inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    edges = [0.0, -0.0, 4 * math.sqrt(2), -4 * math.sqrt(2), 1e4, -1e4, 1e-30, -1e-30]
    values = np.concatenate([np.linspace(-12, 12, 100_000), 3 * rng.standard_normal(20_000), edges])
    values = np.resize(values.astype(np.float32), (-(-values.size // ROW), ROW))
    return values, (0.5 * rng.standard_normal(ROW)).astype(np.float32)


def exact_gelu(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("path", PATHS, ids=str)
def test_each_path_stays_within_its_bound_of_exact_gelu(path: KernelPath, with_bias: bool) -> None:
    require(path, "gelu")
    x, bias = inputs()
    bias = bias if with_bias else None
    v = x + bias if bias is not None else x          # the kernel adds in F32, as here
    results = [run_gelu(path, x, bias, threads) for threads in THREADS]
    error = np.abs(results[0] - exact_gelu(v)) / np.maximum(1.0, np.abs(v))
    assert error.max() < BOUND, f"{path}: {error.max():.3g} at {v.flat[error.argmax()]}"
    for other in results[1:]:                 # the work split never changes a result
        assert np.array_equal(other, results[0])


def test_a_bias_of_the_wrong_length_is_refused() -> None:
    g = Graph()
    try:
        x, bias = g.input(F32, ROW, 4, name="x"), g.input(F32, ROW + 1, name="bias")
        with pytest.raises(ValueError, match="bias"):
            ops.gelu(g, x, KernelPath(Arithmetic.F32, Isa.REFERENCE), bias)
    finally:
        g.close()
