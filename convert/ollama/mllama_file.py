"""Ollama's single-file `mllama` GGUF (v0.7.0 to v0.30): its keys, its tensors, and which converter wrote it.

Ollama's converter (convert/convert_mllama.go) changed between v0.7.0 and v0.7.1 (#10807, #10716): v0.7.1
permutes the rows of the vision and cross-attention q/k projections and stores the global vision gates
through tanh, where v0.7.0 did neither. The file does not say which wrote it; `converter_version` tells
them apart as docs/OLLAMA.md explains.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from convert.ollama.store import MLLAMA, OllamaError
from convert.tokenizer import Vocabulary
from models import ggml
from models.mllama import weights as W
from models.mllama.hparams import (HParamsError, ImagePreprocessing, MllamaHParams, Rope, TextHParams, VisionHParams,
                                   hf_aspect_ratios)

# The keys Ollama writes (convert_mllama.go KV: llama.* renamed mllama.*, plus its vision keys).
ARCHITECTURE = "general.architecture"
VOCAB_SIZE = "mllama.vocab_size"
CONTEXT_LENGTH = "mllama.context_length"
EMBEDDING_LENGTH = "mllama.embedding_length"
FEED_FORWARD_LENGTH = "mllama.feed_forward_length"
BLOCK_COUNT = "mllama.block_count"
HEAD_COUNT = "mllama.attention.head_count"
HEAD_COUNT_KV = "mllama.attention.head_count_kv"
RMS_EPS = "mllama.attention.layer_norm_rms_epsilon"
ROPE_FREQ_BASE = "mllama.rope.freq_base"
CROSS_ATTENTION_LAYERS = "mllama.attention.cross_attention_layers"
VISION_BLOCK_COUNT = "mllama.vision.block_count"
VISION_GLOBAL_BLOCK_COUNT = "mllama.vision.global.block_count"
VISION_INTERMEDIATE_LAYERS = "mllama.vision.intermediate_layers_indices"
VISION_EMBEDDING_LENGTH = "mllama.vision.embedding_length"
VISION_FEED_FORWARD_LENGTH = "mllama.vision.feed_forward_length"
VISION_HEAD_COUNT = "mllama.vision.attention.head_count"
VISION_NORM_EPS = "mllama.vision.attention.layer_norm_epsilon"
VISION_IMAGE_SIZE = "mllama.vision.image_size"
VISION_PATCH_SIZE = "mllama.vision.patch_size"
VISION_MAX_NUM_TILES = "mllama.vision.max_num_tiles"
VISION_NUM_CHANNELS = "mllama.vision.num_channels"
TOKENS = "tokenizer.ggml.tokens"
TOKEN_TYPES = "tokenizer.ggml.token_type"
MERGES = "tokenizer.ggml.merges"
PRE_TOKENIZER = "tokenizer.ggml.pre"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"
PAD_ID = "tokenizer.ggml.padding_token_id"
EOS_IDS = "tokenizer.ggml.eos_token_ids"          # written by convert.go since v0.7.1 (#10577)
CHAT_TEMPLATE = "tokenizer.chat_template"

# The other place the position gate is stored: 1 - tanh(gate). lva reads the tanh (`v.tile_position_embd.gate`).
POSITION_GATE_COMPLEMENT = "v.position_embd.gate"
IMAGE_TOKEN = "<|image|>"

# Ollama's runtime never read preprocessing constants from the file: it used CLIP's (model/imageproc/images.go),
# which are also what the published Llama 3.2 Vision preprocessor_config.json says.
CLIP_PREPROCESSING = ImagePreprocessing(image_mean=(0.48145466, 0.4578275, 0.40821073),
                                        image_std=(0.26862954, 0.26130258, 0.27577711))

V0_7_0 = "v0.7.0"
V0_7_1 = "v0.7.1+"


@dataclass(frozen=True)
class ConverterVersion:
    version: str        # V0_7_0 or V0_7_1
    evidence: str       # why: shown to the user and kept in the imported files' metadata


class OllamaMllamaFile:
    """One model blob, opened for reading; `label` names it in messages (e.g. `llama3.2-vision:11b`)."""

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label
        try:
            self.reader = gguf.GGUFReader(path)
        except (ValueError, OSError, IndexError, KeyError, OverflowError) as e:
            raise OllamaError(f"the model blob of {label} is not a readable GGUF file ({_first_line(e)}); "
                              f"pull it again") from None
        self.metadata: dict[str, Any] = {f.name: f.contents() for f in self.reader.fields.values()}
        self.tensors = {t.name: t for t in self.reader.tensors}
        architecture = self.metadata.get(ARCHITECTURE)
        if architecture == "llama":
            raise OllamaError(f"{label} is a text-only Llama ('llama' GGUF); lva imports Llama 3.2 Vision, "
                              f"whose Ollama GGUF has architecture 'mllama' (e.g. llama3.2-vision)")
        if architecture != MLLAMA:
            raise OllamaError(f"{label} is a {architecture!r} model, not Llama 3.2 Vision ('mllama')")

    # ------------------------------------------------------------------------------------------ metadata

    def _key(self, key: str) -> Any:
        if key not in self.metadata:
            raise OllamaError(f"the model blob of {self.label} lacks the key {key}; it is not a complete mllama GGUF")
        return self.metadata[key]

    @cached_property
    def tokens(self) -> list[str]:
        return list(self._key(TOKENS))

    @cached_property
    def image_token_id(self) -> int:
        """Ollama's runtime hard-coded 128256; the token list says where `<|image|>` really is."""
        if IMAGE_TOKEN not in self.tokens:
            raise OllamaError(f"the vocabulary of {self.label} has no {IMAGE_TOKEN} token")
        return self.tokens.index(IMAGE_TOKEN)

    @cached_property
    def hparams(self) -> MllamaHParams:
        k = self._key
        intermediate = tuple(int(i) for i in k(VISION_INTERMEDIATE_LAYERS))
        vision_hidden = int(k(VISION_EMBEDDING_LENGTH))
        max_tiles = int(k(VISION_MAX_NUM_TILES))
        try:
            text = TextHParams(
                vocab_size=int(k(VOCAB_SIZE)), hidden_size=int(k(EMBEDDING_LENGTH)),
                intermediate_size=int(k(FEED_FORWARD_LENGTH)), num_hidden_layers=int(k(BLOCK_COUNT)),
                num_attention_heads=int(k(HEAD_COUNT)), num_key_value_heads=int(k(HEAD_COUNT_KV)),
                rms_norm_eps=float(k(RMS_EPS)), max_position_embeddings=int(k(CONTEXT_LENGTH)),
                cross_attention_layers=tuple(int(i) for i in k(CROSS_ATTENTION_LAYERS)),
                rope=Rope(theta=float(k(ROPE_FREQ_BASE))))
            text.validate()
            vision = VisionHParams(
                hidden_size=vision_hidden, intermediate_size=int(k(VISION_FEED_FORWARD_LENGTH)),
                num_hidden_layers=int(k(VISION_BLOCK_COUNT)), num_global_layers=int(k(VISION_GLOBAL_BLOCK_COUNT)),
                attention_heads=int(k(VISION_HEAD_COUNT)), intermediate_layers_indices=intermediate,
                image_size=int(k(VISION_IMAGE_SIZE)), patch_size=int(k(VISION_PATCH_SIZE)),
                num_channels=int(k(VISION_NUM_CHANNELS)), max_num_tiles=max_tiles,
                # Not stored by Ollama: the projector's input width and HF's grid list follow from the rest.
                vision_output_dim=vision_hidden * (1 + len(intermediate)),
                norm_eps=float(k(VISION_NORM_EPS)), supported_aspect_ratios=tuple(hf_aspect_ratios(max_tiles)))
            vision.validate()
        except HParamsError as e:
            raise OllamaError(f"the model blob of {self.label} has unusable hyperparameters: {e}") from None
        return MllamaHParams(text=text, vision=vision, preprocessing=CLIP_PREPROCESSING,
                             image_token_id=self.image_token_id)

    @cached_property
    def vocabulary(self) -> Vocabulary:
        """The text vocabulary (the first `vocab_size` tokens; `<|image|>` and padding lie past it)."""
        size = self.hparams.text.vocab_size
        if len(self.tokens) < size:
            raise OllamaError(f"the vocabulary of {self.label} has {len(self.tokens)} tokens, fewer than its "
                              f"vocab_size {size}")
        ids = {token: i for i, token in enumerate(self.tokens[:size])}
        optional = lambda key: int(self.metadata[key]) if key in self.metadata else None  # noqa: E731
        return Vocabulary(
            tokens=self.tokens[:size],
            token_types=[int(t) for t in self._key(TOKEN_TYPES)[:size]],
            merges=list(self.metadata.get(MERGES, [])),
            bos_id=optional(BOS_ID), eos_id=optional(EOS_ID), pad_id=optional(PAD_ID),
            eot_id=ids.get("<|eot_id|>"), eom_id=ids.get("<|eom_id|>"),
            pre=str(self.metadata.get(PRE_TOKENIZER, "llama-bpe")),
        )

    @property
    def chat_template(self) -> str | None:
        template = self.metadata.get(CHAT_TEMPLATE)
        return str(template) if template else None

    @cached_property
    def converter_version(self) -> ConverterVersion:
        """v0.7.0 or v0.7.1+, from what only one of them writes (docs/OLLAMA.md, "Telling v0.7.0 from v0.7.1")."""
        if EOS_IDS in self.metadata:
            return ConverterVersion(V0_7_1, f"it has {EOS_IDS}, which Ollama's converter writes since v0.7.1")
        gates = [self.scalar(n.ollama) for i in range(self.hparams.vision.num_global_layers)
                 for n in W.names(W.GlobalVisionLayer, ollama_prefix=W.global_vision_layer_prefixes(i)[0])
                 if n.field in ("attn_gate", "ffn_gate")]
        if any(abs(g) > 1 for g in gates):
            return ConverterVersion(V0_7_0, "its global vision gates are raw (|gate| > 1): v0.7.1+ stores tanh")
        return ConverterVersion(V0_7_0, f"it lacks {EOS_IDS}, which v0.7.1+ writes for Llama 3.2 Vision Instruct")

    # ------------------------------------------------------------------------------------------ tensors

    def tensor(self, name: str) -> gguf.ReaderTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise OllamaError(f"the model blob of {self.label} lacks tensor {name}; it is not a complete "
                              f"mllama GGUF") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy order (rows last), as lva's writers take shapes."""
        return tuple(int(d) for d in reversed(self.tensor(name).shape))

    def raw_rows(self, name: str) -> np.ndarray:
        """The stored bytes as uint8 [n_rows, row_bytes]: a view into the memory-mapped file."""
        t = self.tensor(name)
        row_bytes = ggml.row_bytes(t.tensor_type, int(t.shape[0]))
        return np.asarray(t.data).reshape(-1).view(np.uint8).reshape(-1, row_bytes)

    def rows_as_float(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) dequantized to float32, as ggml computes with them."""
        t = self.tensor(name)
        raw = self.raw_rows(name)[start:stop]
        if t.tensor_type == T.F32:
            return raw.view(np.float32).copy()
        return gguf.quants.dequantize(raw, t.tensor_type).reshape(stop - start, -1).astype(np.float32)

    def scalar(self, name: str) -> float:
        values = self.rows_as_float(name, 0, 1).reshape(-1)
        if values.size != 1:
            raise OllamaError(f"tensor {name} of {self.label} holds {values.size} values, not one gate")
        return float(values[0])


def _first_line(error: Exception) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__
