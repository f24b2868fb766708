"""lva's compiled CPU kernels (the C files beside this one), loaded with ctypes, and what this CPU runs of them.

The library is built from source on install (setup.py). Where it is missing, lva keeps ggml's own ops and
says so once (calibration.py).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from ctypes import c_int, c_int64, c_size_t, c_void_p

from models import ggml
from models.kernels.paths import Arithmetic, Isa, KernelError, KernelPath

LIBRARY = "models.kernels._cpu"


def origin() -> str | None:
    """The library's file, where it was built."""
    spec = importlib.util.find_spec(LIBRARY)
    return spec.origin if spec is not None else None


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernels, or None and why not."""
    file = origin()
    if file is None:
        return None, "it was not built when lva was installed (no C compiler?)"
    try:
        library = ctypes.CDLL(file)
    except OSError as exc:
        return None, f"it could not be loaded ({exc})"
    offsets = (c_size_t * 5)()
    library.lva_tensor_offsets(offsets)
    struct = ggml.TensorStruct
    expected = [struct.ne.offset, struct.nb.offset, struct.src.offset, struct.data.offset, ctypes.sizeof(struct)]
    if list(offsets) != expected:
        return None, "its copy of struct ggml_tensor does not match this ggml"
    library.lva_pack.argtypes = [c_int, c_int, c_void_p, c_int64, c_int64, c_size_t, c_void_p]
    library.lva_pack.restype = None
    library.lva_packed_bytes.argtypes = [c_int, c_int64, c_int64]
    library.lva_packed_bytes.restype = c_int64
    return library, ""


def required() -> ctypes.CDLL:
    """The library, or a one-line error saying why it is missing."""
    library, why = load()
    if library is None:
        raise KernelError(f"lva's CPU kernels are not available: {why}")
    return library


def isas() -> list[Isa]:
    """The instruction sets this CPU runs, detected at run time by the library (empty when it is not built)."""
    library, _ = load()
    if library is None:
        return []
    mask = library.lva_isas()
    return [isa for isa in Isa if mask & (1 << isa.value)]


def runs(path: KernelPath, op: str) -> bool:
    """Whether this CPU and build run `path` for `op` ("attention", "products", "mlp_down", "gelu",
    "cross_attention")."""
    library, _ = load()
    if not path.ours:
        return True
    if library is None or path.isa not in isas():
        return False
    if op == "attention":
        return bool(library.lva_attention_has(path.arithmetic.value, path.isa.value))
    if op in ("products", "mlp_down"):
        return path.arithmetic is not Arithmetic.BF16 and bool(library.lva_product_has(path.arithmetic.value,
                                                                                         path.isa.value))
    return path.arithmetic is Arithmetic.F32            # the GELU and the cross-attention compute in F32


def max_head_dim() -> int:
    return required().lva_attention_max_head_dim()


def cross_attention_max_queries() -> int:
    return required().lva_cross_attention_max_queries()


def packed_bytes(arithmetic: Arithmetic, k: int, n: int) -> int:
    return required().lva_packed_bytes(arithmetic.value, k, n)


def function(name: str) -> int:
    """The address of one of the library's ops, for `Graph.custom`."""
    address = ctypes.cast(getattr(required(), name), ctypes.c_void_p).value
    if address is None:
        raise KernelError(f"lva's CPU kernels have no {name}")
    return address
