"""Our int16 matrix product (models/kernels/cpu.c, `lva_int16_product`) against float64 products.

The vision tower's F16 matrices run through it beside our AVX2 attention. It rounds each 64 weights of an
output to 14-bit integers and each 64 inputs of a token to 13-bit ones, with one scale each, so its error
has a bound that follows from the inputs alone: half a rounding step of one operand times the other,
summed over k. Every path must stay within it (plus F32's rounding of the sums), give the same bits as
the reference path, and give the same bits on any number of threads. On Gaussian data its error is also
compared with that of ggml's F16 product, which rounds the inputs to F16: measured on the development
machine (AMD EPYC with AVX-512 BF16, 2026-11-29) on the encoder's and the projector's shapes, three seeds
each, the mean error is 0.99 of F16's and the largest 0.89 to 1.11 of F16's largest (the bounds: 1.1, 1.3).
"""

from __future__ import annotations

import numpy as np
import pytest

from models import ggml
from models.ggml import F16, F32, Graph
from models.kernels import cpu as kernels

BLOCK, WEIGHT_LARGEST, INPUT_LARGEST = 64, 8191, 4095
MEAN_RATIO_BOUND, LARGEST_RATIO_BOUND = 1.1, 1.3
# k inputs, n outputs, tokens: whole and partial blocks, tiles and token blocks; the tiny models' widths
SHAPES = [(64, 16, 4), (48, 104, 13), (104, 48, 97), (240, 80, 5), (1280, 1280, 101)]
ENCODER_SHAPES = [(1280, 5120, 1601), (5120, 1280, 1601)]        # ffn_up, ffn_down over a tile's tokens


def run_product(path: str, weights: np.ndarray, x: np.ndarray, threads: int) -> np.ndarray:
    """weights [n, k] F16 and x [tokens, k] F32 through the kernel: [tokens, n]."""
    n, k = weights.shape
    backend = ggml.Backend(threads)
    held = Graph(2)
    matrix = held.new(F16, k, n, name="w")
    buffer = backend.alloc(held)
    ggml.tensor_set(matrix, weights)
    packed_graph, packed_buffer, (packed,) = kernels.int16_packed(backend, [matrix])
    scratch, g = ggml.Scratch(backend), Graph()
    try:
        x_in = g.input(F32, k, x.shape[0], name="x")
        out = g.output(kernels.int16_product(g, packed, x_in, path))
        scratch.run(g, {x_in: x})
        return ggml.tensor_get(out)
    finally:
        g.close()
        scratch.close()
        for graph, memory in ((packed_graph, packed_buffer), (held, buffer)):
            ggml.free_buffer(memory)
            graph.close()
        backend.close()


def random_inputs(k: int, n: int, tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
    return weights, rng.standard_normal((tokens, k)).astype(np.float32)


def rounding_bound(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[tokens, n]: what rounding both operands to the kernel's integers can cost each output, at most."""
    def blocks(a: np.ndarray) -> np.ndarray:        # [rows, k] -> [rows, blocks, 64], zero-padded
        a = np.abs(a.astype(np.float64))
        padded = np.zeros((a.shape[0], -(-a.shape[1] // BLOCK) * BLOCK))
        padded[:, :a.shape[1]] = a
        return padded.reshape(a.shape[0], -1, BLOCK)
    w, v = blocks(weights), blocks(x)
    w_step, x_step = w.max(axis=2) / WEIGHT_LARGEST / 2, v.max(axis=2) / INPUT_LARGEST / 2   # half steps
    w_sum, x_sum = w.sum(axis=2), v.sum(axis=2)
    bound = x_step @ w_sum.T + x_sum @ w_step.T + BLOCK * x_step @ w_step.T
    return bound + 1e-6 * (np.abs(x.astype(np.float64)) @ np.abs(weights.astype(np.float64)).T)  # F32 sums


@pytest.mark.parametrize("path", sorted(kernels.PATHS))
def test_each_path_stays_within_the_rounding_bound_and_matches_the_reference(path: str) -> None:
    if path not in kernels.runnable_paths():
        pytest.skip(f"this CPU cannot run the {path} path (not run)")
    for seed, (k, n, tokens) in enumerate(SHAPES):
        weights, x = random_inputs(k, n, tokens, seed)
        exact = x.astype(np.float64) @ weights.astype(np.float64).T
        results = [run_product(path, weights, x, threads) for threads in (1, 2, 3)]
        assert np.all(np.abs(results[0] - exact) <= rounding_bound(weights, x)), (path, k, n, tokens)
        for other in results[1:]:                 # the work split never changes a result
            assert np.array_equal(other, results[0]), (path, k, n, tokens)
        if path != "reference":                   # the same integers and F32 operations in the same order
            assert np.array_equal(results[0], run_product("reference", weights, x, 1)), (path, k, n, tokens)


@pytest.mark.parametrize("k, n, tokens", ENCODER_SHAPES)
def test_on_the_encoders_shapes_it_is_as_close_as_ggmls_f16_product(k: int, n: int, tokens: int) -> None:
    path = next((p for p in kernels.FASTEST_FIRST if p in kernels.runnable_paths()), None)
    if path is None:
        pytest.skip("this CPU runs no SIMD path (not run)")
    weights, x = random_inputs(k, n, tokens, 11)
    exact = x.astype(np.float64) @ weights.astype(np.float64).T
    error = np.abs(run_product(path, weights, x, 2) - exact)
    assert np.all(error <= rounding_bound(weights, x))
    f16_error = np.abs(x.astype(np.float16).astype(np.float64) @ weights.astype(np.float64).T - exact)
    assert error.mean() < MEAN_RATIO_BOUND * f16_error.mean(), f"{error.mean():.3g} against {f16_error.mean():.3g}"
    assert error.max() < LARGEST_RATIO_BOUND * f16_error.max(), f"{error.max():.3g} against {f16_error.max():.3g}"


def test_a_packed_matrix_of_another_width_is_refused() -> None:
    backend = ggml.Backend(1)
    held, g = Graph(2), Graph()
    matrix = held.new(F16, 128, 16, name="w")
    buffer = backend.alloc(held)
    ggml.tensor_set(matrix, np.zeros((16, 128), np.float16))
    packed_graph, packed_buffer, (packed,) = kernels.int16_packed(backend, [matrix])
    try:
        with pytest.raises(ValueError, match="does not take 64 inputs"):
            kernels.int16_product(g, packed, g.input(F32, 64, 4, name="x"), "reference")
    finally:
        g.close()
        for graph, memory in ((packed_graph, packed_buffer), (held, buffer)):
            ggml.free_buffer(memory)
            graph.close()
        backend.close()
