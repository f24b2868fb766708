"""lva's CPU kernels as ggml graph nodes (custom ops), each taking the `KernelPath` it runs.

CPU backend only: a custom op is a function of this process, which no other device can run
(`ggml.Backend.check_ops` refuses it there).
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from ctypes import c_float, c_int32
from typing import Sequence

from gguf import GGMLQuantizationType

from models import ggml
from models.ggml import F16, F32, Graph, Tensor
from models.kernels import library
from models.kernels.paths import Arithmetic, KernelPath

I8 = GGMLQuantizationType.I8
PACKED_ARITHMETICS = (Arithmetic.F32, Arithmetic.INT16, Arithmetic.INT8)


class AttentionParams(ctypes.Structure):
    """`struct lva_attention_params` of attention.c."""

    _fields_ = [("heads", c_int32), ("real", c_int32), ("scale", c_float), ("arithmetic", c_int32), ("isa", c_int32)]


class CrossParams(ctypes.Structure):
    """`struct lva_cross_params` of cross_attention.c."""

    _fields_ = [("scale", c_float), ("isa", c_int32)]


class ProductParams(ctypes.Structure):
    """`struct lva_product_params` of products.c."""

    _fields_ = [("arithmetic", c_int32), ("isa", c_int32)]


def fused_attention(g: Graph, q: Tensor, k: Tensor, v: Tensor, heads: int, real: int, scale: float,
                    path: KernelPath) -> Tensor:
    """softmax(scale q kᵀ) v per head, [d, n_q] F32, for q [d, n_q] and k, v [d, n_kv] (F32, contiguous rows).

    Queries before `real` attend to every key; the others to the first `real` keys (the encoder's
    real-first order)."""
    d, n_q = ggml.shape(q)[:2]
    if d % heads or not 0 < real <= n_q or real > ggml.shape(k)[1]:
        raise ValueError(f"fused attention: {d} channels in {heads} heads, {real} real of {n_q} queries")
    if any(ggml.struct(t).type != int(F32) or ggml.struct(t).nb[0] != 4 for t in (q, k, v)):
        raise ValueError("fused attention takes F32 tensors with contiguous rows")
    params = AttentionParams(heads, real, scale, path.arithmetic.value, _isa(path))
    return g.custom(F32, (d, n_q), (q, k, v), library.function("lva_attention"), params)


def gelu(g: Graph, x: Tensor, path: KernelPath, bias: Tensor | None = None) -> Tensor:
    """gelu(x + bias) elementwise, erf's form, for a contiguous F32 x [n, ...] and an F32 bias of n values:
    within 2.5e-7 × max(1, |x|) of the exact (a rational erf, evaluated in F32)."""
    sources = (x,) if bias is None else (x, bias)
    if any(ggml.struct(t).type != int(F32) or not ggml.is_contiguous(t) for t in sources):
        raise ValueError("the GELU kernel takes contiguous F32 tensors")
    if bias is not None and ggml.shape(bias) != (ggml.shape(x)[0], 1, 1, 1):
        raise ValueError(f"GELU: a bias of {ggml.shape(bias)} for rows of {ggml.shape(x)[0]}")
    return g.custom(F32, ggml.shape(x), sources, library.function("lva_gelu"), c_int32(_isa(path)))


def cross_attention_fits(head_dim: int, queries: int, kv_type: int) -> bool:
    """Whether `cross_attention` takes these: F16 image K/V, head dims of whole 16-wide vectors, and at most
    the few queries (query heads per KV head x rows) of a decoded token or two."""
    return (library.load()[0] is not None and kv_type == int(F16) and head_dim % 16 == 0
            and queries <= library.cross_attention_max_queries())


def cross_attention(g: Graph, q: Tensor, key: Tensor, value_t: Tensor, scale: float, path: KernelPath) -> Tensor:
    """softmax(scale q keyᵀ) value per KV head, [hd, n_q, kv] F32, for q [hd, n_q, kv] F32 (contiguous) and
    an image's F16 key [hd, tokens, kv] and value_t [tokens, hd, kv]: the decoder's cross-attention of a
    decoded token, reading each KV head's keys and values once."""
    hd, n_q = ggml.shape(q)[:2]
    if not cross_attention_fits(hd, n_q, ggml.struct(key).type) or ggml.struct(value_t).type != int(F16):
        raise ValueError(f"cross-attention kernel: {n_q} queries of {hd} over F16 K/V only")
    if not ggml.is_contiguous(q) or any(ggml.struct(t).nb[0] != 2 for t in (key, value_t)):
        raise ValueError("cross-attention kernel: contiguous queries and K/V rows")
    return g.custom(F32, ggml.shape(q)[:3], (q, key, value_t), library.function("lva_cross_attention"),
                    CrossParams(scale, _isa(path)))


# ------------------------------------------------------------------------------------------- products


def packs(matrix: Tensor) -> bool:
    """Whether `pack` takes this matrix: a 2-D F16 one in host memory, with the library built."""
    return (library.load()[0] is not None and ggml.struct(matrix).type == int(F16)
            and ggml.shape(matrix)[2:] == (1, 1) and ggml.struct(matrix).nb[0] == 2)


def pack(backend: ggml.Backend, matrices: Sequence[Tensor], path: KernelPath) -> tuple[ggml.Memory, list[Tensor]]:
    """Copies of F16 matrices (`packs`; on the CPU backend) in the layout `product` multiplies in
    `path.arithmetic` (products.c), packed by the library on every core.

    Returns the copies' memory (the caller closes it) and the copies, in order."""
    lib = library.required()
    if path.arithmetic not in PACKED_ARITHMETICS or not all(packs(m) for m in matrices):
        raise ValueError(f"{path} products take 2-D F16 matrices")
    memory = ggml.Memory(len(matrices))
    packed = [memory.new(I8, _bytes_per_output(path.arithmetic, *ggml.shape(m)[:2]), ggml.shape(m)[1],
                         name=ggml.name_of(m).decode()) for m in matrices]
    memory.allocate(backend)

    def pack_one(matrix: Tensor, copy: Tensor) -> None:
        k, n = ggml.shape(matrix)[:2]
        lib.lva_pack(path.arithmetic.value, _isa(path), ggml.struct(matrix).data, k, n,
                     ggml.struct(matrix).nb[1], ggml.struct(copy).data)
    try:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:   # ctypes lets go of the GIL
            list(pool.map(pack_one, matrices, packed))
    except BaseException:
        memory.close()
        raise
    return memory, packed


def product(g: Graph, packed: Tensor, x: Tensor, path: KernelPath, original: Tensor | None = None) -> Tensor:
    """W x, [n, tokens] F32, for a matrix `pack` packed for `path` and x [k, tokens] F32 with contiguous rows.
    INT8 also reads the `original` F16 matrix: the weights of the few outlier input channels it takes out
    (products.c)."""
    k, tokens = ggml.shape(x)[:2]
    n = ggml.shape(packed)[1]
    if ggml.struct(packed).type != int(I8) or ggml.shape(packed)[0] != _bytes_per_output(path.arithmetic, k, n):
        raise ValueError(f"{path} product: the packed matrix does not take {k} inputs")
    if ggml.struct(x).type != int(F32) or ggml.struct(x).nb[0] != 4 or ggml.shape(x)[2:] != (1, 1):
        raise ValueError(f"{path} product: x is F32 [k, tokens] with contiguous rows")
    sources: tuple[Tensor, ...] = (packed, x)
    if path.arithmetic is Arithmetic.INT8:
        if original is None or ggml.shape(original)[:2] != (k, n) or not packs(original):
            raise ValueError(f"{path} product: the F16 matrix it was packed from is needed beside it")
        sources = (packed, x, original)
    params = ProductParams(path.arithmetic.value, _isa(path))
    return g.custom(F32, (n, tokens), sources, library.function("lva_product"), params)


def _isa(path: KernelPath) -> int:
    """The instruction set of one of our kernels' paths, as the library numbers it."""
    if path.isa is None:
        raise ValueError(f"{path} is ggml's own op, not one of lva's kernels")
    return path.isa.value


def _bytes_per_output(arithmetic: Arithmetic, k: int, n: int) -> int:
    """Bytes per output of a packed matrix (rounded up): its values and scales, k and n padded."""
    return -(-library.packed_bytes(arithmetic, k, n) // n)
