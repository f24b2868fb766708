"""A GGUF file's type (F32, BF16, Q4_K_M...), named from the tensors it holds, never from `general.file_type`.

The key cannot be trusted: Ollama's converter writes 1 (F16) into every file it makes, whatever its
tensors are (since v0.11.1, BF16 text matrices from a BF16 checkpoint such as Meta's). So what a model
is named and described as, and what the runtime decides from it (an F32 KV cache for F32 weights), come
from the tensors. The rule is llama.cpp's for a file without the key (llama_model_loader: the type that
dominates, a k-quant named as its _M mix), weighed by the values each type holds in the file's matrices:
1-D tensors (norms, gates, RoPE factors) are F32 whatever the file's type.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from math import prod
from pathlib import Path
from typing import Iterable, Sequence

from gguf import GGMLQuantizationType as T
from gguf import GGUF_MAGIC, GGUFValueType, LlamaFileType

from models.errors import LvaError

# llama.cpp's names where a type's own name is not a file type: a k-quant names the mix its quantizer makes,
# MXFP4 the mixture-of-experts files it is made for.
MIXES = {T.F32: LlamaFileType.ALL_F32, T.Q3_K: LlamaFileType.MOSTLY_Q3_K_M, T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
         T.Q5_K: LlamaFileType.MOSTLY_Q5_K_M, T.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE}
_SCALARS = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
            GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
            GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}


class FileTypeError(LvaError):
    """A file whose tensor table cannot be read, or whose matrices are of a type llama.cpp names no file type for."""


def file_type_of(tensors: Iterable[tuple[T, Sequence[int]]]) -> LlamaFileType:
    """The file type of tensors given as (ggml type, shape): the type holding most of the matrices' values."""
    values: Counter[T] = Counter()
    for qtype, shape in tensors:
        if sum(d > 1 for d in shape) >= 2:
            values[T(qtype)] += prod(shape)
    if not values:
        raise FileTypeError("it holds no matrices")
    dominant = max(values, key=lambda qtype: (values[qtype], -qtype))
    if dominant in MIXES:
        return MIXES[dominant]
    try:
        return LlamaFileType[f"MOSTLY_{dominant.name}"]
    except KeyError:
        raise FileTypeError(f"its matrices are {dominant.name}, which llama.cpp names no file type for") from None


def quant_name(file_type: LlamaFileType) -> str:
    """As lva names quants (and files): MOSTLY_Q4_K_M -> Q4_K_M, ALL_F32 -> F32."""
    return file_type.name.split("_", 1)[1]


def read_file_type(path: Path) -> LlamaFileType:
    """The file type of a GGUF file on disk; raises FileTypeError for a file that is not a readable GGUF."""
    table = tensor_table(path)
    try:
        return file_type_of(table)
    except FileTypeError as e:
        raise FileTypeError(f"{path.name}: {e}") from None


def tensor_table(path: Path) -> list[tuple[T, tuple[int, ...]]]:
    """(type, shape in ggml order) of every tensor, from the header alone.

    The metadata is skipped, not decoded: gguf-py's GGUFReader decodes every vocabulary string, about 8 s
    for Llama 3's 128k tokens and 280k merges, where walking past them takes a twentieth of a second.
    """
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as header:
            return _Header(header).tensors()
    except (OSError, ValueError, struct.error, IndexError) as e:
        raise FileTypeError(f"{path.name} is not a readable GGUF file ({e})") from None


class _Header:
    """A cursor over a GGUF header (v2 and v3, little-endian): magic, version, counts, metadata, tensor infos."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.offset = data, 0

    def tensors(self) -> list[tuple[T, tuple[int, ...]]]:
        magic, version = self._unpack("<II")
        if magic != GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"magic {magic:#x}, version {version}")
        n_tensors, n_metadata = self._unpack("<QQ")
        for _ in range(n_metadata):
            self._skip_string()                                     # the key
            self._skip_value(GGUFValueType(*self._unpack("<I")))
        table = []
        for _ in range(n_tensors):
            self._skip_string()                                     # the name
            (n_dims,) = self._unpack("<I")
            shape = self._unpack(f"<{n_dims}Q")
            qtype, _ = self._unpack("<IQ")                          # type, data offset
            table.append((T(qtype), shape))
        return table

    def _unpack(self, fmt: str) -> tuple[int, ...]:
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def _skip_string(self) -> None:
        (length,) = self._unpack("<Q")
        self.offset += length

    def _skip_value(self, value_type: GGUFValueType) -> None:
        if value_type == GGUFValueType.STRING:
            self._skip_string()
        elif value_type == GGUFValueType.ARRAY:
            item_type, count = self._unpack("<IQ")
            item_type = GGUFValueType(item_type)
            if item_type in _SCALARS:
                self.offset += count * _SCALARS[item_type]
            else:
                for _ in range(count):
                    self._skip_value(item_type)
        else:
            self.offset += _SCALARS[value_type]
