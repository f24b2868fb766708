"""Memory traffic of a decoded token: the machine's read bandwidth, and the bytes a token reads with and without
the cross-attention layers (their ratio bounds the decode rate with an image; runtime_bench.py's target)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGUFReader

BANDWIDTH_BYTES = 2 * 10**9          # far larger than any cache
IMAGE_ONLY_CROSS_TENSORS = ("attn_k.weight", "attn_v.weight", "attn_k_norm.weight")
F16_BYTES = 2                        # the image K/V are F16 unless the cross layers are F32


@dataclass
class Bytes:
    """What one decoded token reads: weights (llama.cpp's and the cross layers') and the image K/V."""

    text_weights: int                # text GGUF tensors except token_embd (a row lookup, not a read of it all)
    cross_weights: int               # cross.blk.* in the vision file, less attn_k/attn_v (image side only)
    n_cross: int
    kv_heads: int
    head_dim: int
    cross_file_bytes: int            # every cross.blk.* tensor

    def image_kv(self, image_tokens: int) -> int:
        return self.n_cross * 2 * self.kv_heads * self.head_dim * image_tokens * F16_BYTES

    def with_cross(self, image_tokens: int) -> int:
        return self.text_weights + self.cross_weights + self.image_kv(image_tokens)


def measure_bandwidth(threads: int) -> dict[str, float]:
    """Bytes/s at which numpy reads a 2 GB float32 array, best of 3, per reduction, on `threads` threads.

    Each thread reduces its own chunk (numpy releases the GIL inside), as llama.cpp's threads each read
    their share of the weights. Which reduction reads fastest depends on the CPU: numpy's pairwise
    `sum` is partly limited by arithmetic on some cores, BLAS `sdot` of a chunk with itself (each
    element loaded once) usually is not; the fastest one is the best lower bound on the bandwidth.
    The single-threaded `sum` is kept for comparison with earlier figures.
    """
    array = np.ones(BANDWIDTH_BYTES // 4, dtype=np.float32)
    chunks = np.array_split(array, threads)
    kernels = {"sum": np.sum, "max": np.max, "dot": lambda c: np.dot(c, c)}
    rates = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, kernel in kernels.items():
            rates[name] = array.nbytes / _best_of(3, lambda: list(pool.map(kernel, chunks)))
    rates["sum, 1 thread"] = array.nbytes / _best_of(3, lambda: array.sum())
    return rates


def _best_of(n: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(n):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def bytes_per_token(text_path: Path, vision_path: Path) -> Bytes:
    """Weight bytes a decoded token reads, from the GGUF tensor tables.

    llama.cpp reads every matrix of the text file once per token except the token embedding, of which
    it reads one row. The cross layers add their own matrices, except K and V, which project the image
    once when it is encoded, and, per layer, the image's K and V.
    """
    text = GGUFReader(text_path)
    text_weights = sum(int(t.n_bytes) for t in text.tensors if t.name != "token_embd.weight")
    vision = GGUFReader(vision_path)
    cross = [t for t in vision.tensors if t.name.startswith("cross.blk.")]
    per_token = [t for t in cross if not t.name.endswith(IMAGE_ONLY_CROSS_TENSORS)]
    n_cross = len({t.name.split(".")[2] for t in cross})
    meta = {f.name: f.contents() for f in vision.fields.values()}
    heads = _meta(meta, "attention.head_count")
    kv_heads = _meta(meta, "attention.head_count_kv")
    hidden = _meta(meta, "embedding_length")
    return Bytes(text_weights, sum(int(t.n_bytes) for t in per_token), n_cross, kv_heads, hidden // heads,
                 sum(int(t.n_bytes) for t in cross))


def _meta(meta: dict, suffix: str) -> int:
    """A text hyperparameter from the vision file's metadata, whatever its architecture prefix."""
    for key, value in meta.items():
        if key.endswith(suffix) and "vision" not in key:
            return int(value)
    raise KeyError(suffix)
