"""A typed ctypes binding to the ggml that llama-cpp-python ships, limited to what lva uses.

ggml has no stable ABI: struct layouts and signatures move between releases, so the binding is only
trusted with the exact llama-cpp-python it was written against. Importing this module checks that.
"""

from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGMLQuantizationType

import llama_cpp

PINNED_LLAMA_CPP_PYTHON = "0.3.36"


class LlamaCppVersionError(RuntimeError):
    """The installed llama-cpp-python is not the one the ggml binding was written for."""


if llama_cpp.__version__ != PINNED_LLAMA_CPP_PYTHON:
    raise LlamaCppVersionError(
        f"lva needs llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON} (found {llama_cpp.__version__}); "
        f"reinstall with: pip install 'llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}'"
    )

from llama_cpp._ggml import libggml as _lib  # noqa: E402  (after the version check, on purpose)

_lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
_lib.ggml_quantize_chunk.restype = ctypes.c_size_t
_lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
_lib.ggml_row_size.restype = ctypes.c_size_t
_lib.ggml_blck_size.argtypes = [ctypes.c_int]
_lib.ggml_blck_size.restype = ctypes.c_int64
_lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
_lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool


def block_size(qtype: GGMLQuantizationType) -> int:
    """Values per quantization block; a row must be a multiple of it."""
    return int(_lib.ggml_blck_size(int(qtype)))


def row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    return int(_lib.ggml_row_size(int(qtype), n_per_row))


def quantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize a 2-D float32 array row by row with ggml's own reference quantizer.

    Returns the raw bytes as uint8 [n_rows, row_bytes], the layout ggml and GGUF store.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    if n_per_row % block_size(qtype):
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block_size(qtype)} (got {n_per_row})")
    if _lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} needs an importance matrix")
    out = np.empty((n_rows, row_bytes(qtype, n_per_row)), dtype=np.uint8)
    written = _lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out
