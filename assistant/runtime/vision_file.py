"""The vision GGUF on its devices: tower, cross layers, image-token embedding, hyperparameters."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from assistant.runtime.errors import ModelError
from models import ggml
from models.gguf_tensors import GGUFTensors
from models.kernels.paths import Paths
from models.mllama import gguf_keys as K
from models.mllama.cross_attention import Gates
from models.mllama.hparams import MllamaHParams
from models.mllama.vision import VisionTower, tower_paths
from models.mllama.weights import (CrossAttentionLayer, ImageToken, VisionLayer, cross_attention_prefixes,
                                   cross_layer_of, gguf_name, vision_layer_prefixes)

Progress = Callable[[str, float], None]


class VisionFile:
    """Read in two steps: `VisionFile(path)` reads the hyperparameters and the tensor table, `load` places
    the weights."""

    def __init__(self, path: Path) -> None:
        self.tensors = GGUFTensors(path)
        meta = self.tensors.metadata
        if meta.get("general.architecture") != K.ARCHITECTURE:
            raise ModelError(f"{path.name} is not an lva vision file (architecture "
                             f"{meta.get('general.architecture')!r})")
        self.pair_id = meta.get(K.PAIR_ID)
        self.hp = MllamaHParams.from_gguf_metadata(meta)
        first_cross = cross_attention_prefixes(self.hp.text.cross_attention_layers[0])[0]
        self.tower_type = self._stored_type(gguf_name(VisionLayer, "attn_q", vision_layer_prefixes(0)[0]))
        cross_type = self._stored_type(gguf_name(CrossAttentionLayer, "attn_k", first_cross))
        self.kv_type = ggml.F32 if cross_type == int(ggml.F32) else ggml.F16    # the image K/V's
        self.tower: VisionTower | None = None
        self.cross_layers: dict[int, CrossAttentionLayer] = {}
        self.gates: dict[int, Gates] = {}
        self.image_token_embedding = np.zeros(0, dtype=np.float32)

    def _stored_type(self, name: str) -> int:
        info = next((t for t in self.tensors.reader.tensors if t.name == name), None)
        if info is None:
            raise ModelError(f"{self.tensors.path.name} has no tensor {name!r}; was it written by `lva convert`?")
        return int(info.tensor_type)

    def load(self, backend_of: Callable[[str], ggml.Backend], tower_on_cpu: bool, chosen: Paths,
             progress: Progress | None) -> VisionTower:
        """Place every tensor on the backend `backend_of(name)` names; the tower runs `chosen`'s paths where it
        can (`tower_paths`: the tower's type and device decide). Returns the tower."""
        # The cross layers run for every decoded token: on the CPU, give them its repacked layouts, as
        # llama.cpp gives its own layers. The vision tower runs once per image and stays memory-mapped.
        self.tensors.load(backend_of, (lambda f: progress("loading vision model", f)) if progress else None,
                          repack=lambda name: cross_layer_of(name)[0] is not None)
        tower = VisionTower.load(self.tensors, self.hp.vision,
                                 tower_paths(chosen, self.tower_type, self.hp.vision, tower_on_cpu))
        self.tower = tower
        for index in self.hp.text.cross_attention_layers:
            prefix = cross_attention_prefixes(index)[0]
            self.cross_layers[index] = self.tensors.fill(CrossAttentionLayer, prefix)
            self.gates[index] = Gates.load(self.tensors, prefix)
        info = next(t for t in self.tensors.reader.tensors if t.name == gguf_name(ImageToken, "embd"))
        self.image_token_embedding = np.asarray(info.data, dtype=np.float32).reshape(-1).copy()
        return tower

    def close(self) -> None:
        if self.tower:
            self.tower.close()
        self.tensors.close()
