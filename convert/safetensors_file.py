"""Read safetensors shards row-range by row-range through short-lived memory maps.

The `safetensors` package hands numpy no bf16, and a map held open for the whole conversion would
keep every touched page resident. Mapping only the rows being converted and closing the map right
after keeps peak memory at one chunk, whatever the size of the model.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.errors import ConvertError

ITEM_SIZE = {"BF16": 2, "F16": 2, "F32": 4}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int               # absolute offset of the first byte in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def read_flat(self, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor, as float32."""
        if stop <= start:
            return np.empty(0, dtype=np.float32)
        item = ITEM_SIZE[self.dtype]
        begin = self.offset + start * item
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        length = (stop - start) * item + (begin - aligned)
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), length, offset=aligned, access=mmap.ACCESS_READ) as m:
            raw = np.frombuffer(m, dtype=np.uint8, count=length - (begin - aligned), offset=begin - aligned)
            values = _to_float32(raw, self.dtype)
            del raw
        return values


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    return raw.view(np.float32).copy()


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check one shard's header; a truncated or corrupt file is a one-line ConvertError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path.name} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ConvertError(f"{path.name} is truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConvertError(f"{path.name} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path.name} is corrupt: its safetensors header is not a JSON object")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ConvertError(f"{path.name} is corrupt: bad header entry for {name}") from None
        if dtype not in ITEM_SIZE:
            raise ConvertError(f"{path.name}: tensor {name} has dtype {dtype}; lva reads BF16, F16 and F32")
        n_elements = int(np.prod(shape, dtype=np.int64))
        if end - begin != n_elements * ITEM_SIZE[dtype] or begin < 0:
            raise ConvertError(f"{path.name} is corrupt: tensor {name} has inconsistent offsets")
        if data_start + end > size:
            raise ConvertError(f"{path.name} is truncated ({size} bytes, its header needs {data_start + end})")
        entries[name] = TensorEntry(name, dtype, shape, path, data_start + begin, end - begin)
    return entries
