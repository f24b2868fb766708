"""Our matrix products (models/kernels/products.c, `lva_product`) against float64 products.

The vision tower's F16 matrices run through them, in the arithmetic the calibration chooses:

- f32: the weights widened exactly, the activations as they are, F32 fused multiply-adds. Its error is
  F32's rounding of the sums alone: at most k x 2^-24 x (|x| . |w|) for each output.
- int16: each 64 weights of an output rounded to 14-bit integers and each 64 inputs of a token to 13-bit
  ones, with one scale each; int8: the weights to 7-bit integers (±127), each 64 inputs spread over the
  unsigned bytes VNNI takes, 0..255 from their smallest to their largest (0 included). So their error has
  a bound that follows from the inputs alone: half a rounding step of one operand times the other, summed
  over k (plus F32's rounding of the sums).

Every path stays within its bound, gives the same bits as its arithmetic's reference path (the same
integers, or the same chain of fused multiply-adds, and the same F32 operations in the same order), and the
same bits on any number of threads. On Gaussian data int16's error is also compared with that of ggml's F16
product, which rounds the inputs to F16: measured on the development machine (AMD EPYC with AVX-512 BF16,
2026-11-29) on the encoder's and the projector's shapes, three seeds each, the mean error is 0.99 of F16's
and the largest 0.89 to 1.11 of F16's largest (the bounds: 1.1, 1.3).
"""

from __future__ import annotations

import numpy as np
import pytest

from models import ggml
from models.ggml import F16, F32, Graph
from models.kernels import ops
from models.kernels.paths import Arithmetic, Isa, KernelPath
from tests.kernel_paths import PRODUCTS, require

BLOCK = 64
LARGEST = {Arithmetic.INT16: 8191, Arithmetic.INT8: 127}                        # the weights' largest integer
MEAN_RATIO_BOUND, LARGEST_RATIO_BOUND = 1.1, 1.3
# k inputs, n outputs, tokens: whole and partial blocks, tiles and token blocks; the tiny models' widths; a
# depth past one chunk of the F32 tiles (512)
SHAPES = [(64, 16, 4), (48, 104, 13), (104, 48, 97), (240, 80, 5), (1280, 1280, 101), (1100, 40, 7)]
ENCODER_SHAPES = [(1280, 5120, 1601), (5120, 1280, 1601)]        # ffn_up, ffn_down over a tile's tokens


def run_product(path: KernelPath, weights: np.ndarray, x: np.ndarray, threads: int) -> np.ndarray:
    """weights [n, k] F16 and x [tokens, k] F32 through the kernel: [tokens, n]."""
    n, k = weights.shape
    backend = ggml.Backend(threads)
    scratch, g = ggml.Scratch(backend), Graph()
    try:
        with ggml.Memory(1) as held:
            matrix = held.new(F16, k, n, name="w")
            held.allocate(backend)
            ggml.tensor_set(matrix, weights)
            packed_memory, (packed,) = ops.pack(backend, [matrix], path)
            with packed_memory:
                x_in = g.input(F32, k, x.shape[0], name="x")
                out = g.output(ops.product(g, packed, x_in, path, matrix))
                scratch.run(g, {x_in: x})
                return ggml.tensor_get(out)
    finally:
        g.close()
        scratch.close()
        backend.close()


def random_inputs(k: int, n: int, tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
    return weights, rng.standard_normal((tokens, k)).astype(np.float32)


def rounding_bound(arithmetic: Arithmetic, weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[tokens, n]: what the arithmetic's rounding can cost each output, at most."""
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(weights.astype(np.float64)).T
    sums = weights.shape[1] * 2.0 ** -24 * magnitude                     # F32's rounding of the sums
    if arithmetic is Arithmetic.F32:
        return sums
    def blocks(a: np.ndarray) -> np.ndarray:        # [rows, k] -> [rows, blocks, 64], zero-padded
        padded = np.zeros((a.shape[0], -(-a.shape[1] // BLOCK) * BLOCK))
        padded[:, :a.shape[1]] = a
        return padded.reshape(a.shape[0], -1, BLOCK)
    w, v = blocks(weights.astype(np.float64)), blocks(x.astype(np.float64))
    w_step = np.abs(w).max(axis=2) / LARGEST[arithmetic] / 2                               # half steps
    if arithmetic is Arithmetic.INT16:
        x_step = np.abs(v).max(axis=2) / 4095 / 2
    else:                                           # spread from the smallest (or 0) to the largest (or 0)
        x_step = (np.maximum(v.max(axis=2), 0) - np.minimum(v.min(axis=2), 0)) / 255 / 2
    w_sum, x_sum = np.abs(w).sum(axis=2), np.abs(v).sum(axis=2)
    return x_step @ w_sum.T + x_sum @ w_step.T + BLOCK * x_step @ w_step.T + sums


@pytest.mark.parametrize("path", PRODUCTS, ids=str)
def test_each_path_stays_within_the_rounding_bound_and_matches_the_reference(path: KernelPath) -> None:
    require(path, "products")
    reference = KernelPath(path.arithmetic, Isa.REFERENCE)
    for seed, (k, n, tokens) in enumerate(SHAPES):
        weights, x = random_inputs(k, n, tokens, seed)
        exact = x.astype(np.float64) @ weights.astype(np.float64).T
        results = [run_product(path, weights, x, threads) for threads in (1, 2, 3)]
        assert np.all(np.abs(results[0] - exact) <= rounding_bound(path.arithmetic, weights, x)), (path, k, n, tokens)
        for other in results[1:]:                 # the work split never changes a result
            assert np.array_equal(other, results[0]), (path, k, n, tokens)
        if path != reference:
            assert np.array_equal(results[0], run_product(reference, weights, x, 1)), (path, k, n, tokens)


@pytest.mark.parametrize("k, n, tokens", ENCODER_SHAPES)
def test_on_the_encoders_shapes_int16_is_as_close_as_ggmls_f16_product(k: int, n: int, tokens: int) -> None:
    path = next((KernelPath(Arithmetic.INT16, isa) for isa in (Isa.AVX512, Isa.AVX2)
                 if ops.library.runs(KernelPath(Arithmetic.INT16, isa), "products")), None)
    if path is None:
        pytest.skip("this CPU runs no SIMD int16 path (not run)")
    weights, x = random_inputs(k, n, tokens, 11)
    exact = x.astype(np.float64) @ weights.astype(np.float64).T
    error = np.abs(run_product(path, weights, x, 2) - exact)
    assert np.all(error <= rounding_bound(Arithmetic.INT16, weights, x))
    f16_error = np.abs(x.astype(np.float16).astype(np.float64) @ weights.astype(np.float64).T - exact)
    assert error.mean() < MEAN_RATIO_BOUND * f16_error.mean(), f"{error.mean():.3g} against {f16_error.mean():.3g}"
    assert error.max() < LARGEST_RATIO_BOUND * f16_error.max(), f"{error.max():.3g} against {f16_error.max():.3g}"


def test_a_packed_matrix_of_another_width_is_refused() -> None:
    backend, g = ggml.Backend(1), Graph()
    path = KernelPath(Arithmetic.INT16, Isa.REFERENCE)
    try:
        with ggml.Memory(1) as held:
            matrix = held.new(F16, 128, 16, name="w")
            held.allocate(backend)
            ggml.tensor_set(matrix, np.zeros((16, 128), np.float16))
            packed_memory, (packed,) = ops.pack(backend, [matrix], path)
            with packed_memory, pytest.raises(ValueError, match="does not take 64 inputs"):
                ops.product(g, packed, g.input(F32, 64, 4, name="x"), path)
    finally:
        g.close()
        backend.close()


def test_int8_rounds_inputs_of_one_sign_twice_as_finely() -> None:
    """GELU's outputs, the MLP's down product's inputs, are nearly all >= -0.17: spread over 0..255 they
    round with about half the step of ±127 around 0. The weights here are 8-bit integers (each block's
    largest 127) times 2^-10, which int8 keeps exactly, so the inputs' rounding is all the error. Measured
    (relative RMS error against float64): 2.6e-3 where the inputs are >= 0, 5.3e-3 for the same magnitudes of
    both signs, 0.49x; the bound is 0.7x."""
    path = next((p for p in PRODUCTS if p.arithmetic is Arithmetic.INT8 and p.isa is not Isa.REFERENCE
                 and ops.library.runs(p, "products")), KernelPath(Arithmetic.INT8, Isa.REFERENCE))
    rng = np.random.default_rng(9)
    integers = rng.integers(-127, 128, (256, 1024))
    integers[:, ::BLOCK] = 127
    weights, x = (integers * 2.0 ** -10).astype(np.float16), rng.standard_normal((128, 1024)).astype(np.float32)
    errors = []
    for inputs in (np.abs(x), x):
        exact = inputs.astype(np.float64) @ weights.astype(np.float64).T
        errors.append(np.linalg.norm(run_product(path, weights, inputs, 2) - exact) / np.linalg.norm(exact))
    assert errors[0] < 0.7 * errors[1], errors


def test_int8_takes_the_outlier_channels_out_of_its_blocks() -> None:
    """A trained ViT's residual stream has a few channels far larger than the rest; rounded with the others,
    they would set their blocks' scales. Measured on 4 such channels at 30x (relative RMS error against
    float64): 1.7e-2 with them in the blocks, 4.2e-3 taken out (numpy's model of the kernel); the bound
    is 6e-3."""
    path = next((p for p in PRODUCTS if p.arithmetic is Arithmetic.INT8 and p.isa is not Isa.REFERENCE
                 and ops.library.runs(p, "products")), KernelPath(Arithmetic.INT8, Isa.REFERENCE))
    weights, x = random_inputs(1280, 512, 256, 5)
    x[:, [3, 400, 777, 1100]] *= 30
    exact = x.astype(np.float64) @ weights.astype(np.float64).T
    result = run_product(path, weights, x, 2)
    assert np.linalg.norm(result - exact) / np.linalg.norm(exact) < 6e-3
    assert np.array_equal(result, run_product(KernelPath(Arithmetic.INT8, Isa.REFERENCE), weights, x, 1))
