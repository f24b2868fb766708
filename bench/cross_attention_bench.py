"""One decoded token's cross-attention against a 4-tile image's K/V: Q·Kᵀ in the two orientations ggml can
compute it, then the whole attention as ggml's ops and as our CPU kernel (models/kernels/cpu.c).

At 11B shapes (8 KV heads of 128, 4 query heads each, 6404 image tokens) a cross-attention layer reads
13 MB of keys per decoded token. `mul_mat(K, q)` makes the image tokens the rows of the "weight" and the
4 query heads the columns; `mul_mat(q, K)` makes them the wide side. ggml's CPU kernels are far from
equal on the two, which is why `models/mllama/cross_attention.py` uses the second and transposes the
small result. The whole attention reads 26 MB of F16 keys and values per layer; ggml's four ops (product,
transposed copy, softmax, product) each pass over their data with their own thread sync, our kernel reads
each KV head's keys and values once.

    python bench/cross_attention_bench.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import ggml  # noqa: E402
from models.ggml import F16, F32, Graph  # noqa: E402
from models.kernels import library, ops  # noqa: E402
from models.kernels.paths import Arithmetic, Isa, KernelPath  # noqa: E402

HEAD_DIM, IMAGE_TOKENS, KV_HEADS, GROUP = 128, 6404, 8, 4
REPEATS = 50


def milliseconds(backend: ggml.Backend, build, key: int) -> float:
    g = Graph()
    q = g.input(F32, HEAD_DIM, GROUP, KV_HEADS, name="q")
    g.output(build(g, q, key))
    scratch = ggml.Scratch(backend)
    feeds = {q: np.random.default_rng(0).standard_normal((KV_HEADS, GROUP, HEAD_DIM)).astype(np.float32)}
    scratch.run(g, feeds)
    start = time.perf_counter()
    for _ in range(REPEATS):
        scratch.run(g, feeds)
    elapsed = (time.perf_counter() - start) / REPEATS * 1e3
    scratch.close()
    g.close()
    return elapsed


def main() -> None:
    backend = ggml.Backend(os.cpu_count() or 1)
    keys = np.random.default_rng(1).standard_normal((KV_HEADS, IMAGE_TOKENS, HEAD_DIM)).astype(np.float32)
    print(f"one decoded token, {KV_HEADS}x{GROUP} heads of {HEAD_DIM}, {IMAGE_TOKENS} image tokens, "
          f"{os.cpu_count()} threads, mean of {REPEATS}")
    print("| keys | mul_mat(K, q) ms | mul_mat(q, K) + transpose ms | ratio |")
    print("|---|--:|--:|--:|")
    for qtype, values in ((F16, keys.astype(np.float16)), (F32, keys)):
        with ggml.Memory(1) as weights:
            key = weights.new(qtype, HEAD_DIM, IMAGE_TOKENS, KV_HEADS, name="k")
            weights.allocate(backend)
            ggml.tensor_set(key, values)
            tall = milliseconds(backend, lambda g, q, k: g.mul_mat(k, q), key)
            wide = milliseconds(backend, lambda g, q, k: g.cont(g.permute(g.mul_mat(g.cast(q, qtype), k), 1, 0, 2)),
                                key)
            print(f"| {qtype.name} | {tall:.2f} | {wide:.2f} | {tall / wide:.1f} |")
    whole_attention(backend)


def whole_attention(backend: ggml.Backend) -> None:
    """softmax(q Kᵀ / √d) V for one decoded token, F16 K/V as the runtime keeps them."""
    rng = np.random.default_rng(2)
    weights = ggml.Memory(2)
    key = weights.new(F16, HEAD_DIM, IMAGE_TOKENS, KV_HEADS, name="k")
    value_t = weights.new(F16, IMAGE_TOKENS, HEAD_DIM, KV_HEADS, name="v")
    weights.allocate(backend)
    for t in (key, value_t):
        ggml.tensor_set(t, rng.standard_normal(ggml.shape(t)[:3][::-1]).astype(np.float16))
    scale = HEAD_DIM ** -0.5

    def ggml_ops(g: Graph, q: int, _: int) -> int:
        scores = g.soft_max(g.cont(g.permute(g.mul_mat(g.cast(q, F16), key), 1, 0, 2)), None, scale)
        return g.mul_mat(value_t, scores)

    rows = [("ggml: product, transpose, softmax, product", milliseconds(backend, ggml_ops, key))]
    paths = [KernelPath(Arithmetic.F32, isa) for isa in (Isa.AVX512, Isa.AVX2)
             if library.runs(KernelPath(Arithmetic.F32, isa), "cross_attention")]
    rows += [(f"lva kernel, {path}", milliseconds(backend, lambda g, q, _, path=path: ops.cross_attention(
        g, q, key, value_t, scale, path), key)) for path in paths]
    megabytes = 2 * KV_HEADS * IMAGE_TOKENS * HEAD_DIM * 2 / 1e6
    print(f"\nthe whole attention ({megabytes:.0f} MB of F16 K/V):")
    print("| attention | ms | GB/s of K/V |")
    print("|---|--:|--:|")
    for label, ms in rows:
        print(f"| {label} | {ms:.2f} | {megabytes / ms:.1f} |")
    weights.close()


if __name__ == "__main__":
    main()
