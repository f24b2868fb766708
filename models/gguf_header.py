"""A GGUF file's header, read without decoding its vocabulary: the scalar metadata and the tensor table.

gguf-py's GGUFReader decodes every value of every array, 3-4 s for the text file of Llama 3's 128k
tokens and 280k merges on a 2-core EPYC; listing models (`lva models`, `/api/show`) and sizing the KV cache
before a load need only a few scalar keys and the tensors' types and shapes. Walking past the arrays
takes a fortieth of a second. Reading tensor data stays gguf-py's (`gguf_tensors.py`).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as T
from gguf import GGUF_MAGIC, GGUFValueType

from models.errors import LvaError

Scalar = str | int | float | bool

# struct's format for each scalar value type.
_FORMATS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.BOOL: "<?",
            GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I",
            GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


class HeaderError(LvaError):
    """A file whose GGUF header cannot be read."""


@dataclass(frozen=True)
class Header:
    metadata: dict[str, Scalar]                     # every key whose value is not an array
    tensors: list[tuple[T, tuple[int, ...]]]        # (type, shape in ggml order) of every tensor, in order


def read_header(path: Path) -> Header:
    """The header of a GGUF file (v2 or v3, little-endian); raises HeaderError for anything else."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _Cursor(data).header()
    except (OSError, ValueError, struct.error, IndexError, UnicodeDecodeError) as e:
        raise HeaderError(f"{path.name} is not a readable GGUF file ({e})") from None


class _Cursor:
    """Reads a header front to back: magic, version, counts, metadata, tensor infos."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.offset = data, 0

    def header(self) -> Header:
        magic, version = self._unpack("<II")
        if magic != GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"magic {magic:#x}, version {version}")
        n_tensors, n_metadata = self._unpack("<QQ")
        metadata: dict[str, Scalar] = {}
        for _ in range(n_metadata):
            key = self._string()
            value_type = GGUFValueType(*self._unpack("<I"))
            if value_type == GGUFValueType.ARRAY:
                self._skip_array()
            else:
                metadata[key] = self._scalar(value_type)
        tensors = []
        for _ in range(n_tensors):
            self._skip_string()                                     # the name
            (n_dims,) = self._unpack("<I")
            shape = self._unpack(f"<{n_dims}Q")
            qtype, _ = self._unpack("<IQ")                          # type, data offset
            tensors.append((T(qtype), shape))
        return Header(metadata, tensors)

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        self.offset += length
        return self.data[self.offset - length:self.offset].decode("utf-8")

    def _skip_string(self) -> None:
        (length,) = self._unpack("<Q")
        self.offset += length

    def _scalar(self, value_type: GGUFValueType) -> Scalar:
        return self._string() if value_type == GGUFValueType.STRING else self._unpack(_FORMATS[value_type])[0]

    def _skip_array(self) -> None:
        item_type, count = self._unpack("<IQ")
        item_type = GGUFValueType(item_type)
        if item_type in _FORMATS:
            self.offset += count * struct.calcsize(_FORMATS[item_type])
        elif item_type == GGUFValueType.STRING:
            for _ in range(count):
                self._skip_string()
        else:                                                       # arrays of arrays
            for _ in range(count):
                self._skip_array()
