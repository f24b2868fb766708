"""Our CPU kernels (cpu.c) as ggml graph nodes, and which of their paths this CPU runs.

ggml 0.3.36's CPU flash attention multiplies in F32 and has no BF16 path, so the vision encoder's attention,
most of an image's encode time, runs through our fused kernel on the CPU backend (never on another
device); its GELU, a scalar loop in ggml, through our vectorised one; on CPUs without BF16 arithmetic its
F16 matrix products through our int16 ones; and a decoded token's cross-attention over an image's K/V
through one pass over them instead of ggml's four ops. The library is built from source on install
(setup.py). Where it is missing, or `LVA_ATTENTION=ggml`, lva keeps ggml's own ops.
`LVA_ATTENTION=reference|avx2|avx512bf16` forces a path of all of them, for benchmarks and tests.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from ctypes import c_float, c_int32, c_int64, c_size_t, c_void_p

from models import ggml
from gguf import GGMLQuantizationType

from models.ggml import F16, F32, Graph, Tensor

LIBRARY = "models.kernels._cpu"        # cpu.c, built by setup.py
PATHS = {"reference": 0, "avx2": 1, "avx512bf16": 2}
FASTEST_FIRST = ("avx512bf16", "avx2")        # the reference path is for tests: too slow to be chosen
ENVIRONMENT = "LVA_ATTENTION"
log = logging.getLogger("lva")


class KernelError(RuntimeError):
    """A path asked for by name that this machine cannot run; the message is one line."""


class Params(ctypes.Structure):
    """`struct lva_attention_params` of cpu.c."""

    _fields_ = [("heads", c_int32), ("real", c_int32), ("scale", c_float), ("path", c_int32)]


class Int16Params(ctypes.Structure):
    """`struct lva_int16_params` of cpu.c."""

    _fields_ = [("path", c_int32)]


class CrossParams(ctypes.Structure):
    """`struct lva_cross_params` of cpu.c."""

    _fields_ = [("scale", c_float), ("path", c_int32)]


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernel, or None and why not."""
    spec = importlib.util.find_spec(LIBRARY)
    if spec is None or spec.origin is None:
        return None, "it was not built when lva was installed (no C compiler?)"
    try:
        library = ctypes.CDLL(spec.origin)
    except OSError as exc:
        return None, f"it could not be loaded ({exc})"
    offsets = (c_size_t * 5)()
    library.lva_attention_tensor_offsets(offsets)
    struct = ggml.TensorStruct
    expected = [struct.ne.offset, struct.nb.offset, struct.src.offset, struct.data.offset, ctypes.sizeof(struct)]
    if list(offsets) != expected:
        return None, "its copy of struct ggml_tensor does not match this ggml"
    library.lva_int16_pack.argtypes = [c_void_p, c_int64, c_int64, c_size_t, c_void_p]
    library.lva_int16_pack.restype = None
    library.lva_int16_packed_elements.argtypes = [c_int64, c_int64]
    library.lva_int16_packed_elements.restype = c_int64
    return library, ""


def runnable_paths() -> list[str]:
    """The paths this CPU can execute, detected at run time by the library (empty when it is not built)."""
    library, _ = _library()
    if library is None:
        return []
    mask = library.lva_attention_paths()
    return [name for name, bit in PATHS.items() if mask & (1 << bit)]


def max_head_dim() -> int:
    library, _ = _library()
    return library.lva_attention_max_head_dim() if library else 0


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def chosen_path(environment: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The path to run on the CPU, or None for ggml's flash attention.

    `LVA_ATTENTION` names a path or `ggml`; unset, the fastest path this CPU runs. A missing library is
    said once, loudly, because encoding an image is then several times slower.
    """
    wanted = environment.get(ENVIRONMENT, "").strip().lower()
    if wanted == "ggml":
        return None
    library, why = _library()
    if wanted:
        if wanted not in PATHS:
            raise KernelError(f"{ENVIRONMENT}={wanted} is not one of ggml, {', '.join(PATHS)}")
        if library is None:
            raise KernelError(f"{ENVIRONMENT}={wanted}: lva's CPU kernels are not available: {why}")
        if wanted not in runnable_paths():
            raise KernelError(f"{ENVIRONMENT}={wanted}: this CPU cannot run that path "
                              f"(it runs {', '.join(runnable_paths())})")
        return wanted
    if library is None:
        _warn_once(f"lva: its CPU kernels are missing: {why}; images are encoded, and answers about them "
                   f"decoded, with ggml's slower ops. Reinstall lva where a C compiler is available to fix this.")
        return None
    return next((path for path in FASTEST_FIRST if path in runnable_paths()), None)


def path_is_forced(environment: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether `LVA_ATTENTION` names the path, rather than the CPU choosing it."""
    return bool(environment.get(ENVIRONMENT, "").strip())


def fused_attention(g: Graph, q: Tensor, k: Tensor, v: Tensor, heads: int, real: int, scale: float,
                    path: str) -> Tensor:
    """softmax(scale q kᵀ) v per head, [d, n_q] F32, for q [d, n_q] and k, v [d, n_kv] (F32, contiguous rows).

    Queries before `real` attend to every key; the others to the first `real` keys (the encoder's
    real-first order). CPU backend only: other devices cannot run a host function.
    """
    d, n_q = ggml.shape(q)[:2]
    if d % heads or not 0 < real <= n_q or real > ggml.shape(k)[1]:
        raise ValueError(f"fused attention: {d} channels in {heads} heads, {real} real of {n_q} queries")
    if any(ggml.struct(t).type != int(F32) or ggml.struct(t).nb[0] != 4 for t in (q, k, v)):
        raise ValueError("fused attention takes F32 tensors with contiguous rows")
    return g.custom(F32, (d, n_q), (q, k, v), _function("lva_attention"), Params(heads, real, scale, PATHS[path]))


def gelu(g: Graph, x: Tensor, path: str, bias: Tensor | None = None) -> Tensor:
    """gelu(x + bias) elementwise, erf's form, for a contiguous F32 x [n, ...] and an F32 bias of n values:
    within 2.5e-7 × max(1, |x|) of the exact (a rational erf, evaluated in F32). CPU backend only."""
    sources = (x,) if bias is None else (x, bias)
    if any(ggml.struct(t).type != int(F32) or not ggml.is_contiguous(t) for t in sources):
        raise ValueError("the GELU kernel takes contiguous F32 tensors")
    if bias is not None and ggml.shape(bias) != (ggml.shape(x)[0], 1, 1, 1):
        raise ValueError(f"GELU: a bias of {ggml.shape(bias)} for rows of {ggml.shape(x)[0]}")
    return g.custom(F32, ggml.shape(x), sources, _function("lva_gelu"), c_int32(PATHS[path]))


def cross_attention_fits(head_dim: int, queries: int, kv_type: int) -> bool:
    """Whether `cross_attention` takes these: F16 image K/V, head dims of whole 16-wide vectors, and at most
    the few queries (query heads per KV head x rows) of a decoded token or two."""
    library, _ = _library()
    return (library is not None and kv_type == int(F16) and head_dim % 16 == 0
            and queries <= library.lva_cross_attention_max_queries())


def cross_attention(g: Graph, q: Tensor, key: Tensor, value_t: Tensor, scale: float, path: str) -> Tensor:
    """softmax(scale q keyᵀ) value per KV head, [hd, n_q, kv] F32, for q [hd, n_q, kv] F32 (contiguous) and
    an image's F16 key [hd, tokens, kv] and value_t [tokens, hd, kv]: the decoder's cross-attention of a
    decoded token, reading each KV head's keys and values once. CPU backend only."""
    hd, n_q = ggml.shape(q)[:2]
    if not cross_attention_fits(hd, n_q, ggml.struct(key).type) or ggml.struct(value_t).type != int(F16):
        raise ValueError(f"cross-attention kernel: {n_q} queries of {hd} over F16 K/V only")
    if not ggml.is_contiguous(q) or any(ggml.struct(t).nb[0] != 2 for t in (key, value_t)):
        raise ValueError("cross-attention kernel: contiguous queries and K/V rows")
    return g.custom(F32, ggml.shape(q)[:3], (q, key, value_t), _function("lva_cross_attention"),
                    CrossParams(scale, PATHS[path]))


# ------------------------------------------------------------------------------------------- int16 products

I16 = GGMLQuantizationType.I16


def int16_fits(matrix: Tensor) -> bool:
    """Whether `int16_packed` takes this matrix: a 2-D F16 one, with the library built."""
    library, _ = _library()
    return (library is not None and ggml.struct(matrix).type == int(F16) and ggml.shape(matrix)[2:] == (1, 1)
            and ggml.struct(matrix).nb[0] == 2)


def int16_packed(backend: ggml.Backend, matrices: Sequence[Tensor]) -> tuple[Graph, int, list[Tensor]]:
    """Copies of F16 matrices (`int16_fits`, in host memory: the CPU backend) in the layout `int16_product`
    multiplies: 14-bit integers and one scale per 64 values, packed by the library on every core.

    Returns the copies' context and buffer (the caller frees both) and the copies, in order."""
    library, why = _library()
    if library is None:
        raise KernelError(f"lva's CPU kernels are not available: {why}")
    if not all(int16_fits(m) for m in matrices):
        raise ValueError("int16 products take 2-D F16 matrices")
    held = Graph(len(matrices) + 1)
    packed = [held.new(I16, _packed_width(*ggml.shape(m)[:2]), ggml.shape(m)[1], name=ggml.name_of(m).decode())
              for m in matrices]
    buffer = backend.alloc(held)

    def pack(matrix: Tensor, copy: Tensor) -> None:
        k, n = ggml.shape(matrix)[:2]
        library.lva_int16_pack(ggml.struct(matrix).data, k, n, ggml.struct(matrix).nb[1], ggml.struct(copy).data)
    try:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:   # ctypes lets go of the GIL
            list(pool.map(pack, matrices, packed))
    except BaseException:
        ggml.free_buffer(buffer)
        held.close()
        raise
    return held, buffer, packed


def int16_product(g: Graph, packed: Tensor, x: Tensor, path: str) -> Tensor:
    """W x, [n, tokens] F32, for a matrix packed by `int16_packed` and x [k, tokens] F32 with contiguous rows:
    x rounded to 13-bit integers per 64 values, int32 sums scaled into F32. As close to the exact product
    as ggml's F16 product (tests/test_int16_product_kernel.py). CPU backend only."""
    k, tokens = ggml.shape(x)[:2]
    n = ggml.shape(packed)[1]
    if ggml.struct(packed).type != int(I16) or ggml.shape(packed)[0] != _packed_width(k, n):
        raise ValueError(f"int16 product: the packed matrix does not take {k} inputs")
    if ggml.struct(x).type != int(F32) or ggml.struct(x).nb[0] != 4 or ggml.shape(x)[2:] != (1, 1):
        raise ValueError("int16 product: x is F32 [k, tokens] with contiguous rows")
    return g.custom(F32, (n, tokens), (packed, x), _function("lva_int16_product"), Int16Params(PATHS[path]))


def _packed_width(k: int, n: int) -> int:
    """int16 elements per output of a packed matrix (rounded up): its values and F32 scales, k and n padded."""
    library, _ = _library()
    return -(-library.lva_int16_packed_elements(k, n) // n)


def _function(name: str) -> int:
    """The address of one of the library's ops, for `Graph.custom`."""
    library, why = _library()
    if library is None:
        raise KernelError(f"lva's CPU kernels are not available: {why}")
    return ctypes.cast(getattr(library, name), ctypes.c_void_p).value
