"""Write GGUF files tensor by tensor, chunk by chunk, and publish them only when complete.

gguf-py's GGUFWriter writes the header, metadata and tensor table; the data are streamed here in row
chunks so memory stays at one chunk. Files are written as `NAME.part`, fsynced and renamed together
at the end: an interrupted or failed conversion leaves nothing that looks like a finished model.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType, GGUFWriter
from tqdm import tqdm

from convert.errors import ConvertError
from models import ggml
from models.atomic_write import sync_folder

CHUNK_BYTES = 64 * 1024 * 1024          # float32 bytes converted at a time
PART_SUFFIX = ".part"

Rows = Callable[[int, int], np.ndarray]
"""Rows [start, stop) of a tensor seen as 2-D [n_rows, row_length], as float32."""

RawRows = Callable[[int, int], np.ndarray]
"""Rows [start, stop) of a tensor as the bytes a GGUF stores for them: uint8 [n_rows, row_bytes]."""


@dataclass
class PlannedTensor:
    """A tensor written from float32 rows, encoded (or quantized) to `qtype` on the way."""

    name: str
    shape: tuple[int, ...]             # numpy order: the last axis is the row
    qtype: T
    rows: Rows

    @property
    def row_length(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.n_rows * ggml.row_bytes(self.qtype, self.row_length)

    def chunks(self) -> Iterator[tuple[np.ndarray, int]]:
        """(bytes to write, float32 bytes they stand for) a chunk of rows at a time."""
        step = max(1, CHUNK_BYTES // (4 * self.row_length))
        for start in range(0, self.n_rows, step):
            rows = self.rows(start, min(start + step, self.n_rows))
            if not np.all(np.isfinite(rows)):
                raise ConvertError(f"tensor {self.name} holds NaN or infinite values; the checkpoint is corrupt")
            yield encode(rows, self.qtype), rows.nbytes


@dataclass
class CopiedTensor(PlannedTensor):
    """A tensor whose stored bytes are copied from another GGUF as they are: quantized blocks stay bit for bit."""

    rows: RawRows

    def chunks(self) -> Iterator[tuple[np.ndarray, int]]:
        """(bytes to write, the same count) a chunk of rows at a time."""
        step = max(1, CHUNK_BYTES // ggml.row_bytes(self.qtype, self.row_length))
        for start in range(0, self.n_rows, step):
            raw = self.rows(start, min(start + step, self.n_rows))
            yield raw, raw.nbytes


def encode(rows: np.ndarray, qtype: T) -> np.ndarray:
    """float32 rows -> the bytes GGUF stores for `qtype`."""
    if qtype == T.F32:
        return np.ascontiguousarray(rows, dtype=np.float32)
    if qtype == T.F16:
        return rows.astype(np.float16)
    return ggml.quantize_rows(rows, qtype)


def add_metadata(writer: GGUFWriter, metadata: dict[str, Any]) -> None:
    """Typed GGUF key/values from plain Python values (ints as uint32, floats as float32)."""
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_key_value(key, value, GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))


def write_gguf(path: Path, writer: GGUFWriter, tensors: list[PlannedTensor], progress: tqdm) -> None:
    """Write `tensors` after the metadata already added to `writer`; `progress` counts what `chunks` reports."""
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None                   # opened by write_header_to_file
    out = writer.fout[0]
    for t in tensors:
        writer.write_padding(out, out.tell())
        for data, done in t.chunks():
            out.write(data.tobytes())
            progress.update(done)
        writer.write_padding(out, t.nbytes)
    out.flush()
    os.fsync(out.fileno())
    writer.close()


def part_path(path: Path) -> Path:
    return path.with_name(path.name + PART_SUFFIX)


@contextmanager
def published_together(paths: list[Path]) -> Iterator[list[Path]]:
    """Yield `.part` paths to write; on success rename them all into place, on any failure remove them."""
    parts = [part_path(p) for p in paths]
    try:
        yield parts
        for part, final in zip(parts, paths):
            with open(part, "rb") as f:
                os.fsync(f.fileno())
            os.replace(part, final)
        for folder in {p.parent for p in paths}:
            sync_folder(folder)
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
