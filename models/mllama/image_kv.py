"""What the decoder keeps of one image: K and V for every cross layer, on the backend of that layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models import ggml
from models.ggml import F16, Tensor
from models.mllama.hparams import MllamaHParams


@dataclass
class ImageKV:
    """K/V of one image for each cross layer (stack index), in the layouts `cross_attention` reads."""

    memory: list[ggml.Memory]        # one per backend
    keys: dict[int, Tensor]          # cross-layer stack index -> [head_dim, tokens, kv_heads]
    values_t: dict[int, Tensor]      # cross-layer stack index -> [tokens, head_dim, kv_heads]
    num_tokens: int

    @classmethod
    def empty(cls, backends: dict[int, ggml.Backend], hp: MllamaHParams, tokens: int, kv_type) -> ImageKV:
        """Uninitialised K/V for `tokens` image tokens (stack index -> the backend that keeps them)."""
        t = hp.text
        kv = cls([], {}, {}, tokens)
        for backend in dict.fromkeys(backends.values()):
            indices = [i for i, b in backends.items() if b is backend]
            memory = ggml.Memory(2 * len(indices))
            kv.memory.append(memory)
            for i in indices:
                kv.keys[i] = memory.new(kv_type, t.head_dim, tokens, t.num_key_value_heads, name=f"cross.{i}.k")
                kv.values_t[i] = memory.new(kv_type, tokens, t.head_dim, t.num_key_value_heads, name=f"cross.{i}.v")
            try:
                memory.allocate(backend)
            except ggml.DeviceError:
                kv.close()
                raise
        return kv

    def close(self) -> None:
        for memory in self.memory:
            memory.close()
        self.memory = []

    def moved_to(self, backends: dict[int, ggml.Backend], hp: MllamaHParams) -> ImageKV:
        """The same K/V on the given backend of each cross layer; this one is closed."""
        kv_type = ggml.struct(next(iter(self.keys.values()))).type
        moved = ImageKV.empty(backends, hp, self.num_tokens, kv_type)
        for index in self.keys:
            ggml.copy_tensor(self.keys[index], moved.keys[index])
            ggml.copy_tensor(self.values_t[index], moved.values_t[index])
        self.close()
        return moved

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Host copies, for the on-disk feature cache."""
        arrays = {}
        for index in self.keys:
            for name, t in ((f"k.{index}", self.keys[index]), (f"v.{index}", self.values_t[index])):
                dtype = np.float16 if ggml.struct(t).type == int(F16) else np.float32
                arrays[name] = ggml.tensor_get(t, dtype)
        return arrays

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for index in self.keys:
            ggml.tensor_set(self.keys[index], arrays[f"k.{index}"])
            ggml.tensor_set(self.values_t[index], arrays[f"v.{index}"])
