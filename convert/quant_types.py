"""The quantization types `lva convert` offers, and what each means for each part of the model."""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp
from gguf import GGMLQuantizationType as T

from models import ggml


@dataclass(frozen=True)
class QuantType:
    """One `--quant` choice: llama.cpp's mix for the text tower, a ggml type for the cross layers."""

    name: str
    llama_ftype: int              # llama.cpp's file type; its quantizer picks per-tensor types from it
    cross_attention: T            # the matching ggml type for the cross-attention matrices
    description: str

    @property
    def is_float(self) -> bool:
        return self.cross_attention in (T.F32, T.F16, T.BF16)


QUANT_TYPES = {q.name: q for q in (
    QuantType("F32", llama_cpp.LLAMA_FTYPE_ALL_F32, T.F32, "full precision, for reference and parity"),
    QuantType("F16", llama_cpp.LLAMA_FTYPE_MOSTLY_F16, T.F16, "half precision"),
    QuantType("BF16", llama_cpp.LLAMA_FTYPE_MOSTLY_BF16, T.BF16, "bfloat16, the checkpoint's own precision"),
    QuantType("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, T.Q8_0, "8-bit, near lossless"),
    QuantType("Q6_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K, T.Q6_K, "6-bit k-quant"),
    QuantType("Q5_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M, T.Q5_K, "5-bit k-quant mix"),
    QuantType("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, T.Q4_K, "4-bit k-quant mix, the usual choice"),
)}

# llama.cpp's file-type id for a text file written directly in a float type.
FLOAT_FTYPES = {q.cross_attention: q.llama_ftype for q in QUANT_TYPES.values() if q.is_float}

VISION_TYPES = {t.name: t for t in (T.F32, T.F16, T.BF16, T.Q8_0)}
DEFAULT_QUANT = "Q4_K_M"

# What llama.cpp stores when a row does not fit the wanted type's blocks (llama-quant.cpp), then F16.
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def storage_type(wanted: T, n_per_row: int) -> T:
    """The type a matrix with rows of `n_per_row` values is stored in when `wanted` is asked for."""
    for candidate in (wanted, _FALLBACK.get(wanted), T.F16):
        if candidate is not None and n_per_row % ggml.block_size(candidate) == 0:
            return candidate
    return T.F32


def default_vision_type(quant: QuantType) -> T:
    """F16 for the encoder, except that an F32 conversion stays F32 end to end (parity runs)."""
    return T.F32 if quant.cross_attention == T.F32 else T.F16
