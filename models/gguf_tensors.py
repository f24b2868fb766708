"""A GGUF file's tensors as ggml tensors on a backend, and the weight dataclasses filled from them.

On a device that reads host memory (the CPU, Apple's unified memory) the tensors point into the
memory-mapped file, so loading costs no copy and the OS pages weights in on first use; elsewhere they
are copied once into device memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
from gguf import GGUFReader

from models import ggml
from models.mllama.weights import names

Block = TypeVar("Block")
Progress = Callable[[float], None]


class GGUFError(ValueError):
    """A file that is not a readable GGUF, or lacks a tensor the model needs."""


class GGUFTensors:
    """Owns the mapping, the ggml context holding the tensor descriptions, and the backend buffer."""

    def __init__(self, path: Path, backend: ggml.Backend, progress: Progress | None = None) -> None:
        self.path = path
        try:
            self.reader = GGUFReader(path)
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise GGUFError(f"{path} is not a readable GGUF file ({exc})") from None
        self.metadata: dict[str, Any] = {f.name: f.contents() for f in self.reader.fields.values()}
        self.graph = ggml.Graph(len(self.reader.tensors) + 1)
        self.tensors: dict[str, ggml.Tensor] = {}
        for info in self.reader.tensors:
            self.tensors[info.name] = self.graph.new(info.tensor_type, *map(int, info.shape), name=info.name)
        base = self.reader.data.ctypes.data
        self.buffer = backend.map_host(base, self.reader.data.nbytes)
        if self.buffer is not None:
            for info in self.reader.tensors:
                ggml.place(self.buffer, self.tensors[info.name], base + info.data_offset)
        else:
            self.buffer = backend.alloc(self.graph)
            for i, info in enumerate(self.reader.tensors):
                ggml.tensor_set(self.tensors[info.name], np.asarray(info.data).view(np.uint8))
                if progress:
                    progress((i + 1) / len(self.reader.tensors))
        if progress:
            progress(1.0)

    def __getitem__(self, name: str) -> ggml.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path.name} has no tensor {name!r}; was it written by `lva convert`?") from None

    def scalar(self, name: str) -> float:
        """A one-value tensor (a gate) read straight from the file."""
        info = next((t for t in self.reader.tensors if t.name == name), None)
        if info is None or info.n_elements != 1:
            raise GGUFError(f"{self.path.name} has no scalar tensor {name!r}")
        return float(np.asarray(info.data, dtype=np.float32).reshape(-1)[0])

    def fill(self, block: type[Block], gguf_prefix: str = "") -> Block:
        """An instance of a weights dataclass whose fields are this file's tensors."""
        values = {w.field: self[w.gguf] for w in names(block, gguf_prefix)}
        return block(**values)

    def close(self) -> None:
        ggml.free_buffer(self.buffer)
        self.buffer = None
        self.graph.close()
