"""A GGUF file's tensors as ggml tensors on backends, and the weight dataclasses filled from them.

Reading the file (its metadata and tensor table) and placing its tensors on devices are two steps, so a
caller can decide where each tensor goes from the metadata. On a device that reads host memory (the
CPU, Apple's unified memory) the tensors point into the memory-mapped file, so loading costs no copy
and the OS pages weights in on first use; elsewhere they are copied once into device memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from models import ggml
from models.errors import LvaError
from models.mllama.weights import names

Block = TypeVar("Block")
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
Progress = Callable[[float], None]


class GGUFError(LvaError):
    """A file that is not a readable GGUF, or lacks a tensor the model needs."""


class GGUFTensors:
    """Owns the mapping, and per device the ggml context holding the tensor descriptions and its buffer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.reader = GGUFReader(path)
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise GGUFError(f"{path} is not a readable GGUF file ({exc})") from None
        self.metadata: dict[str, Any] = {f.name: f.contents() for f in self.reader.fields.values()}
        self.tensors: dict[str, ggml.Tensor] = {}
        self.memory: list[ggml.Memory] = []                 # per device, and the repacked copies

    def load(self, backend_of: Callable[[str], ggml.Backend], progress: Progress | None = None,
             repack: Callable[[str], bool] = lambda name: False) -> None:
        """Give every tensor memory on the backend `backend_of(name)` chooses, with the file's data."""
        groups: dict[ggml.Backend, list] = {}
        for info in self.reader.tensors:
            groups.setdefault(backend_of(info.name), []).append(info)
        copied, to_copy = 0, sum(len(infos) for b, infos in groups.items() if not b.maps_host_memory)
        for backend, infos in groups.items():
            memory = ggml.Memory(len(infos))
            self.memory.append(memory)
            tensors = {info.name: memory.new(info.tensor_type, *map(int, info.shape), name=info.name) for info in infos}
            base = self.reader.data.ctypes.data
            buffer = backend.map_host(base, self.reader.data.nbytes)
            if buffer is not None:
                memory.adopt(buffer)
                for info in infos:
                    ggml.place(buffer, tensors[info.name], base + info.data_offset)
            else:
                memory.allocate(backend)
                for info in infos:
                    ggml.tensor_set(tensors[info.name], np.asarray(info.data).view(np.uint8))
                    copied += 1
                    if progress:
                        progress(copied / to_copy)
            self.tensors.update(tensors)
            self._repack_for_cpu(backend, [info for info in infos if repack(info.name)])
        if progress:
            progress(1.0)

    def _repack_for_cpu(self, backend: ggml.Backend, candidates: list) -> None:
        """Copy the quantized matrices the CPU kernels have a faster layout for into llama.cpp's CPU_REPACK
        buffer, as llama.cpp does with its own weights; ggml decides per tensor (type, shape, CPU
        features), so a probe allocation asks it which ones before anything is copied."""
        buffer_type = backend.repack_buffer_type()
        candidates = [c for c in candidates if len(c.shape) == 2 and c.tensor_type not in FLOAT_TYPES]
        if buffer_type is None or not candidates:
            return
        with ggml.Memory(len(candidates)) as probe:
            probes = [probe.new(c.tensor_type, *map(int, c.shape)) for c in candidates]
            probe.allocate(backend, buffer_type)
            chosen = [c for c, t in zip(candidates, probes) if ggml.struct(t).extra]
        if not chosen:
            return
        memory = ggml.Memory(len(chosen))
        self.memory.append(memory)
        tensors = {c.name: memory.new(c.tensor_type, *map(int, c.shape), name=c.name) for c in chosen}
        memory.allocate(backend, buffer_type)
        for c in chosen:
            ggml.tensor_set(tensors[c.name], np.asarray(c.data).view(np.uint8))
        self.tensors.update(tensors)

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
        for memory in reversed(self.memory):
            memory.close()
        self.memory.clear()
