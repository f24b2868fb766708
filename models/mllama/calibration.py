"""Which path each hot op runs on this CPU, chosen by measuring them, not by the CPU's flags.

The same arithmetic is twice as fast on one vendor's cores as on another's (BF16 dot products on AMD's
Zen 4 against Intel's cores without AMX, docs/PERFORMANCE.md), so every path this machine can run is
timed on the real shapes of the vision encoder (its widest matrix products, the MLP's down product on
GELU's outputs, its attention, its GELU) and
of a decoded token's cross-attention over a 4-tile image, on a slice of the work: a few seconds in all.
Each op then runs the fastest path whose error is within the bound:

- only arithmetics whose error on an image's cross-attention K/V stays within HF transformers' own bf16
  error on the same image are candidates (`WITHIN_MODEL_BOUND`, from the accuracy table of
  docs/PERFORMANCE.md, measured on a checkpoint at real widths with outlier channels);
- and each candidate must show, on this CPU and the calibration's data (with outlier channels), the error
  its arithmetic is known to have (`OP_BOUNDS`), which catches a kernel broken on an unusual CPU.

The result is kept by the caller (assistant/runtime/calibration_cache.py), keyed by the CPU and versions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from models import ggml
from models.ggml import BF16, F16, F32, Graph, Tensor
from models.kernels import library, ops
from models.kernels.paths import (GGML_BF16_PRODUCTS, GGML_CROSS_ATTENTION, GGML_FLASH_ATTENTION, GGML_GELU_TANH,
                                  GGML_PRODUCTS, Arithmetic, Isa, KernelError, KernelPath, Paths)
from models.mllama import vision
from models.mllama.cross_attention import image_attention

OPS = ("attention", "products", "mlp_down", "gelu", "cross_attention")

# Arithmetics within the model-level bound, per op (docs/PERFORMANCE.md, "Accuracy"): their error on the
# K/V an image leaves in the cross layers is at most HF bf16's own on the outlier checkpoint (bench/
# accuracy_bench.py), with every op on its least accurate candidate at once. INT8 for every product is
# not: 1.65x HF bf16's error even with the outlier channels taken out (its 8-bit weights and inputs round
# about five times as coarsely as BF16 inputs), so it runs only where LVA_PRODUCTS asks for it. INT8 for
# the MLP's down product alone is: its inputs, GELU's outputs, are nearly all of one sign, so spread over
# 0..255 they round twice as finely; 0.79x HF bf16's error beside BF16 attention and INT16 products.
_PRODUCTS = {Arithmetic.F32, Arithmetic.INT16, Arithmetic.BF16, Arithmetic.STORED}
WITHIN_MODEL_BOUND = {
    "attention": {Arithmetic.F32, Arithmetic.INT16, Arithmetic.BF16, Arithmetic.F16},
    "products": _PRODUCTS,
    "mlp_down": _PRODUCTS | {Arithmetic.INT8},
    "gelu": {Arithmetic.F32, Arithmetic.F16},
    "cross_attention": {Arithmetic.F32, Arithmetic.STORED},
}

# Relative RMS error each arithmetic shows on the calibration's data (measured on the development machine
# and bounded at about twice that; tests/test_calibration.py). A path above its bound is never chosen.
OP_BOUNDS = {
    ("attention", Arithmetic.F32): 1e-5, ("attention", Arithmetic.INT16): 2e-3,
    ("attention", Arithmetic.BF16): 1e-2, ("attention", Arithmetic.F16): 2e-3,
    ("products", Arithmetic.F32): 1e-5, ("products", Arithmetic.INT16): 1e-3,
    ("products", Arithmetic.INT8): 1.3e-2, ("products", Arithmetic.BF16): 1e-2,
    ("products", Arithmetic.STORED): 1e-3,
    ("mlp_down", Arithmetic.F32): 1e-5, ("mlp_down", Arithmetic.INT16): 1e-3, ("mlp_down", Arithmetic.INT8): 1.5e-2,
    ("mlp_down", Arithmetic.BF16): 1e-2, ("mlp_down", Arithmetic.STORED): 1e-3,
    ("gelu", Arithmetic.F32): 1e-6, ("gelu", Arithmetic.F16): 1e-2,
    ("cross_attention", Arithmetic.F32): 1e-5, ("cross_attention", Arithmetic.STORED): 2e-3,
}

# The calibration's shapes: the encoder's (1280 wide, 16 heads of 80, 6432 tokens for 4 tiles) on a slice
# of its tokens and heads, and a decoded token's cross-attention over a 4-tile image (8 KV heads of 128).
WIDTH, INTERMEDIATE, HEAD_DIM, TOKENS = 1280, 5120, 80, 384
ATTENTION_HEADS, ATTENTION_TOKENS, ATTENTION_REAL = 1, 6432, 6404
IMAGE_TOKENS, KV_HEADS, QUERY_GROUP, CROSS_HEAD_DIM = 6404, 8, 4, 128
OUTLIERS, OUTLIER_SCALE = (7, 300, 811, 1000), 30.0       # residual channels that trained ViTs make large
UNITS = {"attention": "GFLOP/s", "products": "GFLOP/s", "mlp_down": "GFLOP/s", "gelu": "G values/s",
         "cross_attention": "GB/s"}


@dataclass(frozen=True)
class Measurement:
    """One path of one op on this machine: its best time on the calibration's shapes and its error."""

    op: str
    path: KernelPath
    seconds: float
    work: float                      # FLOP (attention, products), values (GELU) or bytes read (cross-attention)
    error: float                     # relative RMS error against float64 on the calibration's data
    bound: float

    @property
    def rate(self) -> float:
        """In UNITS[op]."""
        return self.work / self.seconds / 1e9

    @property
    def within_bound(self) -> bool:
        return self.error <= self.bound

    def to_json(self) -> dict:
        return {"op": self.op, "path": str(self.path), "seconds": self.seconds, "work": self.work,
                "error": self.error, "bound": self.bound}

    @classmethod
    def from_json(cls, data: dict) -> Measurement:
        return cls(str(data["op"]), KernelPath.parse(str(data["path"])), float(data["seconds"]), float(data["work"]),
                   float(data["error"]), float(data["bound"]))


def candidates(op: str) -> list[KernelPath]:
    """Every path this machine runs for `op` whose arithmetic is within the model-level bound; the scalar
    reference paths, the tests' yardstick, are left out."""
    ours = [KernelPath(arithmetic, isa) for isa in library.isas() if isa is not Isa.REFERENCE
            for arithmetic in (Arithmetic.F32, Arithmetic.INT16, Arithmetic.INT8, Arithmetic.BF16)]
    ggml_paths = {"attention": [GGML_FLASH_ATTENTION], "products": [GGML_PRODUCTS], "mlp_down": [GGML_PRODUCTS],
                  "gelu": [GGML_GELU_TANH], "cross_attention": [GGML_CROSS_ATTENTION]}[op]
    if op in ("products", "mlp_down") and ggml.cpu_features().get("AVX512_BF16") == "1":
        ggml_paths.append(GGML_BF16_PRODUCTS)
    runnable = [p for p in ours if library.runs(p, op) and not _narrower_duplicate(p, op)] + ggml_paths
    return [p for p in runnable if p.arithmetic in WITHIN_MODEL_BOUND[op]]


def _narrower_duplicate(path: KernelPath, op: str) -> bool:
    """AVX512_BF16 adds nothing but the BF16 attention: its other paths are AVX-512's."""
    return path.isa is Isa.AVX512_BF16 and not (op == "attention" and path.arithmetic is Arithmetic.BF16)


def measure(op: str, paths: Iterable[KernelPath], threads: int, runs: int = 2,
            progress: Callable[[], None] | None = None) -> list[Measurement]:
    """Time each path of `op` (the best of `runs`, after one untimed run) and measure its error."""
    measurer = {"attention": _attention, "products": _products, "mlp_down": _mlp_down, "gelu": _gelu,
                "cross_attention": _cross}[op]
    backend = ggml.Backend(threads, ggml.cpu_device())
    scratch = ggml.Scratch(backend)
    try:
        found = []
        for path in paths:
            seconds, work, error = measurer(backend, scratch, path, runs)
            found.append(Measurement(op, path, seconds, work, error, OP_BOUNDS.get((op, path.arithmetic), 0.0)))
            if progress:
                progress()
        return found
    finally:
        scratch.close()
        backend.close()


def fastest(measurements: Iterable[Measurement], op: str) -> KernelPath | None:
    """The fastest path of `op` within its bound, or None when none was measured."""
    within = [m for m in measurements if m.op == op and m.within_bound]
    return min(within, key=lambda m: m.seconds).path if within else None


def choose(measurements: list[Measurement]) -> Paths:
    """Each op's fastest path within its bound (ggml's ops where none is: they are always candidates)."""
    defaults = {"attention": GGML_FLASH_ATTENTION, "products": GGML_PRODUCTS, "mlp_down": GGML_PRODUCTS,
                "gelu": GGML_GELU_TANH, "cross_attention": GGML_CROSS_ATTENTION}
    return Paths(**{op: fastest(measurements, op) or defaults[op] for op in OPS})


def resolve_forced(wanted: KernelPath | Arithmetic, op: str, measurements: list[Measurement]) -> KernelPath:
    """A path `LVA_ATTENTION` or `LVA_PRODUCTS` forces: as named, or for an arithmetic alone the fastest
    instruction set measured for it, else the widest this CPU runs. One line when this machine cannot."""
    if isinstance(wanted, Arithmetic):
        measured = [m for m in measurements if m.op == op and m.path.arithmetic is wanted and m.path.ours]
        if measured:
            return min(measured, key=lambda m: m.seconds).path
        runnable = [KernelPath(wanted, isa) for isa in reversed(library.isas())
                    if library.runs(KernelPath(wanted, isa), op)]
        if not runnable:
            raise KernelError(f"this CPU has no {wanted} path for the {op.replace('_', '-')} "
                              f"(it runs {', '.join(map(str, library.isas())) or 'none of lva’s kernels'})")
        return runnable[0]
    if not library.runs(wanted, op):
        raise KernelError(f"this CPU cannot run {wanted} for the {op.replace('_', '-')} "
                          f"(it runs {', '.join(map(str, library.isas())) or 'none of lva’s kernels'})")
    return wanted


# ------------------------------------------------------------------------------------------- the measurements


def _relative_error(result: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(result - exact) / np.linalg.norm(exact))


def _timed(backend: ggml.Backend, scratch: ggml.Scratch, build: Callable[[Graph], tuple[Tensor, dict]],
           runs: int) -> tuple[float, np.ndarray]:
    """Best seconds of a graph `build` makes (its output and inputs), and the output's values."""
    g = Graph()
    try:
        output, feeds = build(g)
        g.output(output)
        best = math.inf
        for run in range(runs + 1):
            started = time.perf_counter()
            scratch.run(g, feeds)
            if run:
                best = min(best, time.perf_counter() - started)
        return best, ggml.tensor_get(output)
    finally:
        g.close()


def _activations(rng: np.random.Generator, tokens: int, width: int) -> np.ndarray:
    """Normalised activations with a few outlier channels, as a trained ViT's residual stream has."""
    x = rng.standard_normal((tokens, width), dtype=np.float32)
    x[:, [c for c in OUTLIERS if c < width]] *= OUTLIER_SCALE
    return x


def _gelu_outputs(rng: np.random.Generator, tokens: int, width: int) -> np.ndarray:
    """GELU's outputs (its tanh form) over the MLP's up product's: nearly all >= -0.17, a long positive tail."""
    x = 1.5 * rng.standard_normal((tokens, width), dtype=np.float32)
    return (0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))).astype(np.float32)


def _products(backend: ggml.Backend, scratch: ggml.Scratch, path: KernelPath, runs: int) -> tuple[float, float, float]:
    """The encoder's widest products, ffn_up (1280 -> 5120) and ffn_down (5120 -> 1280), on TOKENS tokens."""
    return _timed_products(backend, scratch, path, runs, ((WIDTH, INTERMEDIATE), (INTERMEDIATE, WIDTH)), _activations)


def _mlp_down(backend: ggml.Backend, scratch: ggml.Scratch, path: KernelPath, runs: int) -> tuple[float, float, float]:
    """The MLP's down product (5120 -> 1280) on TOKENS tokens of GELU's outputs."""
    return _timed_products(backend, scratch, path, runs, ((INTERMEDIATE, WIDTH),), _gelu_outputs)


def _timed_products(backend: ggml.Backend, scratch: ggml.Scratch, path: KernelPath, runs: int,
                    shapes: tuple[tuple[int, int], ...],
                    inputs: Callable[[np.random.Generator, int, int], np.ndarray]) -> tuple[float, float, float]:
    """Products of random F16 matrices of these (inputs, outputs) shapes with TOKENS tokens of `inputs`."""
    rng = np.random.default_rng(0)
    seconds, errors = 0.0, []
    for k, n in shapes:
        weights = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(np.float16)
        x = inputs(rng, TOKENS, k)
        with ggml.Memory(1) as held:
            matrix = held.new(BF16 if path == GGML_BF16_PRODUCTS else F16, k, n, name="w")
            held.allocate(backend)
            if path == GGML_BF16_PRODUCTS:
                ggml.tensor_set(matrix, (weights.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16))
            else:
                ggml.tensor_set(matrix, weights)
            packed_memory, original = None, matrix
            if path.ours:
                packed_memory, (matrix,) = ops.pack(backend, [matrix], path)
            try:
                def build(g: Graph, matrix: Tensor = matrix, original: Tensor = original, k: int = k,
                          x: np.ndarray = x) -> tuple[Tensor, dict]:
                    x_in = g.input(F32, k, TOKENS, name="x")
                    return vision.product(g, matrix, x_in, path, original), {x_in: x}
                time_taken, y = _timed(backend, scratch, build, runs)
            finally:
                if packed_memory:
                    packed_memory.close()
        seconds += time_taken
        exact = x[:32].astype(np.float64) @ weights.astype(np.float64).T
        errors.append(_relative_error(y[:32], exact))
    return seconds, sum(2 * TOKENS * k * n for k, n in shapes), max(errors)


def _attention(backend: ggml.Backend, scratch: ggml.Scratch, path: KernelPath, runs: int) -> tuple[float, float, float]:
    """A slice of the encoder's attention over a 4-tile image: one of its 16 heads of 80 (each thread takes
    a share of its queries, as of every head's in the encoder; the packing of K/V per head is negligible)."""
    rng = np.random.default_rng(1)
    d = ATTENTION_HEADS * HEAD_DIM
    q, k, v = (rng.standard_normal((ATTENTION_TOKENS, d), dtype=np.float32) for _ in range(3))

    def build(g: Graph) -> tuple[Tensor, dict]:
        q_in, k_in, v_in = (g.input(F32, d, ATTENTION_TOKENS, name=name) for name in "qkv")
        out = vision.attend(g, q_in, k_in, v_in, ATTENTION_HEADS, ATTENTION_REAL, path)
        return out, {q_in: q, k_in: k, v_in: v}
    seconds, out = _timed(backend, scratch, build, runs)
    exact = np.empty((16, d))
    for h in range(ATTENTION_HEADS):
        heads = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        scores = q[:16, heads].astype(np.float64) @ k[:, heads].astype(np.float64).T / math.sqrt(HEAD_DIM)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        exact[:, heads] = weights @ v[:, heads] / weights.sum(axis=1, keepdims=True)
    pairs = ATTENTION_REAL * ATTENTION_TOKENS + (ATTENTION_TOKENS - ATTENTION_REAL) * ATTENTION_REAL
    return seconds, 4 * HEAD_DIM * ATTENTION_HEADS * pairs, _relative_error(out[:16], exact)


def _gelu(backend: ggml.Backend, scratch: ggml.Scratch, path: KernelPath, runs: int) -> tuple[float, float, float]:
    """The encoder's GELU with its bias, over INTERMEDIATE x TOKENS values."""
    rng = np.random.default_rng(2)
    x = (2 * rng.standard_normal((TOKENS, INTERMEDIATE))).astype(np.float32)
    bias = rng.standard_normal(INTERMEDIATE).astype(np.float32)

    def build(g: Graph) -> tuple[Tensor, dict]:
        x_in, bias_in = g.input(F32, INTERMEDIATE, TOKENS, name="x"), g.input(F32, INTERMEDIATE, name="bias")
        return vision.biased_gelu(g, x_in, bias_in, path), {x_in: x, bias_in: bias}
    seconds, out = _timed(backend, scratch, build, runs)
    v = (x[:8] + bias).astype(np.float64)
    exact = 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))
    return seconds, x.size, _relative_error(out[:8], exact)


def _cross(backend: ggml.Backend, scratch: ggml.Scratch, path: KernelPath, runs: int) -> tuple[float, float, float]:
    """A decoded token's attention over a 4-tile image's F16 K/V (8 KV heads of 128, 4 query heads each)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((KV_HEADS, QUERY_GROUP, CROSS_HEAD_DIM), dtype=np.float32)
    key = rng.standard_normal((KV_HEADS, IMAGE_TOKENS, CROSS_HEAD_DIM)).astype(np.float16)
    value_t = rng.standard_normal((KV_HEADS, CROSS_HEAD_DIM, IMAGE_TOKENS)).astype(np.float16)
    with ggml.Memory(2) as held:
        key_in = held.new(F16, CROSS_HEAD_DIM, IMAGE_TOKENS, KV_HEADS, name="key")
        value_in = held.new(F16, IMAGE_TOKENS, CROSS_HEAD_DIM, KV_HEADS, name="value_t")
        held.allocate(backend)
        ggml.tensor_set(key_in, key)
        ggml.tensor_set(value_in, value_t)

        def build(g: Graph) -> tuple[Tensor, dict]:
            q_in = g.input(F32, CROSS_HEAD_DIM, QUERY_GROUP, KV_HEADS, name="q")
            return image_attention(g, q_in, key_in, value_in, CROSS_HEAD_DIM ** -0.5, path), {q_in: q}
        seconds, out = _timed(backend, scratch, build, runs)
    scores = np.einsum("hqd,htd->hqt", q.astype(np.float64), key.astype(np.float64)) / math.sqrt(CROSS_HEAD_DIM)
    weights = np.exp(scores - scores.max(axis=2, keepdims=True))
    exact = np.einsum("hqt,hdt->hqd", weights / weights.sum(axis=2, keepdims=True), value_t.astype(np.float64))
    return seconds, key.nbytes + value_t.nbytes, _relative_error(out, exact)
