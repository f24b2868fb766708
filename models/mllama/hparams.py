"""Hyperparameters of Llama 3.2 Vision, read from a Hugging Face config and round-tripped through GGUF.

One dataclass per tower plus the image preprocessing constants. `from_hf` accepts both config layouts
seen in the wild: transformers 4.45 (`rope_theta` + `rope_scaling`, as the published checkpoints carry)
and transformers 5 (`rope_parameters`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import LvaError
from models.mllama import gguf_keys as K


class HParamsError(LvaError):
    """The config does not describe a Llama 3.2 Vision model we can run."""


@dataclass(frozen=True)
class Rope:
    """Rotary embedding settings; `llama3` rescales low frequencies for long context (Llama 3.1)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, text_config: dict[str, Any]) -> Rope:
        params = text_config.get("rope_parameters") or dict(text_config.get("rope_scaling") or {})
        theta = params.get("rope_theta", text_config.get("rope_theta", 500000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise HParamsError(f"rope type {rope_type!r} is not supported (expected 'llama3' or 'default')")
        if rope_type == "default":
            return cls(theta=float(theta))
        return cls(
            theta=float(theta),
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            # HF falls back to the context length when the original one is not given.
            original_max_position_embeddings=int(params.get("original_max_position_embeddings",
                                                            text_config.get("max_position_embeddings", 8192))),
        )

    def llama3_factors(self, head_dim: int) -> np.ndarray | None:
        """Per-frequency divisors in llama.cpp's `rope_freqs.weight` form, or None for plain RoPE.

        llama.cpp divides frequency i by factor i; this reproduces HF's `_compute_llama3_parameters`.
        """
        if self.rope_type != "llama3":
            return None
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        factors = []
        for i in range(0, head_dim, 2):
            wavelen = 2 * math.pi * self.theta ** (i / head_dim)
            if wavelen < high_freq_wavelen:
                factors.append(1.0)
            elif wavelen > low_freq_wavelen:
                factors.append(self.factor)
            else:
                smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                    self.high_freq_factor - self.low_freq_factor
                )
                factors.append(1.0 / ((1 - smooth) / self.factor + smooth))
        return np.asarray(factors, dtype=np.float32)


@dataclass(frozen=True)
class TextHParams:
    """The decoder: Llama 3.1 self-attention layers with gated cross-attention layers interleaved."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int                  # self + cross layers
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    cross_attention_layers: tuple[int, ...]
    rope: Rope

    @classmethod
    def from_hf(cls, text_config: dict[str, Any]) -> TextHParams:
        hp = cls(
            vocab_size=int(text_config["vocab_size"]),
            hidden_size=int(text_config["hidden_size"]),
            intermediate_size=int(text_config["intermediate_size"]),
            num_hidden_layers=int(text_config["num_hidden_layers"]),
            num_attention_heads=int(text_config["num_attention_heads"]),
            num_key_value_heads=int(text_config.get("num_key_value_heads", text_config["num_attention_heads"])),
            rms_norm_eps=float(text_config.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(text_config.get("max_position_embeddings", 131072)),
            cross_attention_layers=tuple(int(i) for i in text_config["cross_attention_layers"]),
            rope=Rope.from_hf(text_config),
        )
        hp.validate()
        return hp

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise HParamsError("text heads do not divide the hidden size / each other")
        if self.head_dim % 2:
            raise HParamsError("text head size must be even for RoPE")
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(self.cross_attention_layers)) != len(self.cross_attention_layers):
            raise HParamsError(f"cross_attention_layers {list(self.cross_attention_layers)} do not fit "
                               f"{self.num_hidden_layers} layers")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def self_attention_layers(self) -> list[int]:
        """Stack indices of the Llama layers, in order; the text GGUF numbers them 0, 1, 2, ..."""
        return [i for i in range(self.num_hidden_layers) if i not in self.cross_attention_layers]


@dataclass(frozen=True)
class VisionHParams:
    """The ViT-H/14 image encoder: a local transformer, then a gated global one (HF MllamaVisionModel)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_global_layers: int
    attention_heads: int
    intermediate_layers_indices: tuple[int, ...]
    image_size: int
    patch_size: int
    num_channels: int
    max_num_tiles: int
    vision_output_dim: int
    norm_eps: float
    supported_aspect_ratios: tuple[tuple[int, int], ...]

    @classmethod
    def from_hf(cls, vision_config: dict[str, Any]) -> VisionHParams:
        image_size = vision_config.get("image_size", 560)
        patch_size = vision_config.get("patch_size", 14)
        ratios = vision_config.get("supported_aspect_ratios") or [
            [1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
        hp = cls(
            hidden_size=int(vision_config["hidden_size"]),
            intermediate_size=int(vision_config["intermediate_size"]),
            num_hidden_layers=int(vision_config["num_hidden_layers"]),
            num_global_layers=int(vision_config["num_global_layers"]),
            attention_heads=int(vision_config.get("attention_heads", vision_config.get("num_attention_heads", 16))),
            intermediate_layers_indices=tuple(int(i) for i in vision_config["intermediate_layers_indices"]),
            image_size=int(image_size if isinstance(image_size, int) else image_size[0]),
            patch_size=int(patch_size if isinstance(patch_size, int) else patch_size[0]),
            num_channels=int(vision_config.get("num_channels", 3)),
            max_num_tiles=int(vision_config.get("max_num_tiles", 4)),
            vision_output_dim=int(vision_config["vision_output_dim"]),
            norm_eps=float(vision_config.get("norm_eps", 1e-5)),
            supported_aspect_ratios=tuple((int(h), int(w)) for h, w in ratios),
        )
        hp.validate()
        return hp

    def validate(self) -> None:
        if self.hidden_size % self.attention_heads:
            raise HParamsError("vision heads do not divide the vision hidden size")
        if self.vision_output_dim != self.hidden_size * (1 + len(self.intermediate_layers_indices)):
            raise HParamsError("vision_output_dim is not hidden_size x (1 + number of intermediate layers)")
        if any(not 0 <= i < self.num_hidden_layers for i in self.intermediate_layers_indices):
            raise HParamsError("intermediate_layers_indices point past the local transformer")

    @property
    def num_patches(self) -> int:
        """Vision tokens per tile: the patch grid plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


def hf_aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """HF's `get_all_supported_aspect_ratios`: every (rows, cols) with rows * cols <= max_num_tiles.

    HF quirk: the processor picks the tile grid and numbers aspect_ratio_id from this list alone, never
    from the checkpoint's `supported_aspect_ratios`, of which the model itself reads only the length (rows
    of its aspect-ratio embeddings). The published checkpoints' lists equal this one, and so does the list
    Ollama's runtime built from `max_num_tiles` (model/models/mllama/process_image.go).
    """
    return [(a, b) for a in range(1, max_num_tiles + 1) for b in range(1, max_num_tiles + 1) if a * b <= max_num_tiles]


@dataclass(frozen=True)
class ImagePreprocessing:
    """The checkpoint's MllamaImageProcessor constants; read them, never assume CLIP's."""

    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    resample: int = 2                       # PIL.Image.BILINEAR
    do_convert_rgb: bool = True
    do_normalize: bool = True
    do_rescale: bool = True
    do_pad: bool = True

    @classmethod
    def from_hf(cls, processor_config: dict[str, Any]) -> ImagePreprocessing:
        return cls(
            image_mean=tuple(float(x) for x in processor_config["image_mean"]),
            image_std=tuple(float(x) for x in processor_config["image_std"]),
            rescale_factor=float(processor_config.get("rescale_factor", 1 / 255)),
            resample=int(processor_config.get("resample", 2)),
            do_convert_rgb=bool(processor_config.get("do_convert_rgb", True)),
            do_normalize=bool(processor_config.get("do_normalize", True)),
            do_rescale=bool(processor_config.get("do_rescale", True)),
            do_pad=bool(processor_config.get("do_pad", True)),
        )


@dataclass(frozen=True)
class MllamaHParams:
    """Everything the vision GGUF records about the model, besides its weights."""

    text: TextHParams
    vision: VisionHParams
    preprocessing: ImagePreprocessing
    image_token_id: int

    def gguf_metadata(self) -> dict[str, Any]:
        """Key -> value for the vision file; `from_gguf_metadata` reads the same keys back."""
        t, v, p = self.text, self.vision, self.preprocessing
        return {
            K.TEXT_EMBEDDING_LENGTH: t.hidden_size,
            K.TEXT_FEED_FORWARD_LENGTH: t.intermediate_size,
            K.TEXT_HEAD_COUNT: t.num_attention_heads,
            K.TEXT_HEAD_COUNT_KV: t.num_key_value_heads,
            K.TEXT_RMS_EPS: t.rms_norm_eps,
            K.TEXT_BLOCK_COUNT: t.num_hidden_layers,
            K.TEXT_VOCAB_SIZE: t.vocab_size,
            K.CROSS_ATTENTION_LAYERS: list(t.cross_attention_layers),
            K.IMAGE_TOKEN_ID: self.image_token_id,
            K.VISION_EMBEDDING_LENGTH: v.hidden_size,
            K.VISION_FEED_FORWARD_LENGTH: v.intermediate_size,
            K.VISION_HEAD_COUNT: v.attention_heads,
            K.VISION_NORM_EPS: v.norm_eps,
            K.VISION_BLOCK_COUNT: v.num_hidden_layers,
            K.VISION_GLOBAL_BLOCK_COUNT: v.num_global_layers,
            K.VISION_INTERMEDIATE_LAYERS: list(v.intermediate_layers_indices),
            K.VISION_IMAGE_SIZE: v.image_size,
            K.VISION_PATCH_SIZE: v.patch_size,
            K.VISION_NUM_CHANNELS: v.num_channels,
            K.VISION_MAX_NUM_TILES: v.max_num_tiles,
            K.VISION_OUTPUT_DIM: v.vision_output_dim,
            K.VISION_ASPECT_RATIOS: [x for ratio in v.supported_aspect_ratios for x in ratio],
            K.PREPROCESS_IMAGE_MEAN: list(p.image_mean),
            K.PREPROCESS_IMAGE_STD: list(p.image_std),
            K.PREPROCESS_RESCALE_FACTOR: p.rescale_factor,
            K.PREPROCESS_RESAMPLE: p.resample,
            K.PREPROCESS_DO_CONVERT_RGB: p.do_convert_rgb,
            K.PREPROCESS_DO_NORMALIZE: p.do_normalize,
            K.PREPROCESS_DO_RESCALE: p.do_rescale,
            K.PREPROCESS_DO_PAD: p.do_pad,
        }

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], rope: Rope | None = None,
                           max_position_embeddings: int = 0) -> MllamaHParams:
        """Rebuild from the vision file's keys; RoPE and context length live in the text file."""
        m = meta
        ratios = list(m[K.VISION_ASPECT_RATIOS])
        text = TextHParams(
            vocab_size=int(m[K.TEXT_VOCAB_SIZE]),
            hidden_size=int(m[K.TEXT_EMBEDDING_LENGTH]),
            intermediate_size=int(m[K.TEXT_FEED_FORWARD_LENGTH]),
            num_hidden_layers=int(m[K.TEXT_BLOCK_COUNT]),
            num_attention_heads=int(m[K.TEXT_HEAD_COUNT]),
            num_key_value_heads=int(m[K.TEXT_HEAD_COUNT_KV]),
            rms_norm_eps=float(m[K.TEXT_RMS_EPS]),
            max_position_embeddings=max_position_embeddings,
            cross_attention_layers=tuple(int(i) for i in m[K.CROSS_ATTENTION_LAYERS]),
            rope=rope or Rope(theta=500000.0),
        )
        vision = VisionHParams(
            hidden_size=int(m[K.VISION_EMBEDDING_LENGTH]),
            intermediate_size=int(m[K.VISION_FEED_FORWARD_LENGTH]),
            num_hidden_layers=int(m[K.VISION_BLOCK_COUNT]),
            num_global_layers=int(m[K.VISION_GLOBAL_BLOCK_COUNT]),
            attention_heads=int(m[K.VISION_HEAD_COUNT]),
            intermediate_layers_indices=tuple(int(i) for i in m[K.VISION_INTERMEDIATE_LAYERS]),
            image_size=int(m[K.VISION_IMAGE_SIZE]),
            patch_size=int(m[K.VISION_PATCH_SIZE]),
            num_channels=int(m[K.VISION_NUM_CHANNELS]),
            max_num_tiles=int(m[K.VISION_MAX_NUM_TILES]),
            vision_output_dim=int(m[K.VISION_OUTPUT_DIM]),
            norm_eps=float(m[K.VISION_NORM_EPS]),
            supported_aspect_ratios=tuple(zip(ratios[0::2], ratios[1::2])),
        )
        preprocessing = ImagePreprocessing(
            image_mean=tuple(float(x) for x in m[K.PREPROCESS_IMAGE_MEAN]),
            image_std=tuple(float(x) for x in m[K.PREPROCESS_IMAGE_STD]),
            rescale_factor=float(m[K.PREPROCESS_RESCALE_FACTOR]),
            resample=int(m[K.PREPROCESS_RESAMPLE]),
            do_convert_rgb=bool(m[K.PREPROCESS_DO_CONVERT_RGB]),
            do_normalize=bool(m[K.PREPROCESS_DO_NORMALIZE]),
            do_rescale=bool(m[K.PREPROCESS_DO_RESCALE]),
            do_pad=bool(m[K.PREPROCESS_DO_PAD]),
        )
        return cls(text=text, vision=vision, preprocessing=preprocessing, image_token_id=int(m[K.IMAGE_TOKEN_ID]))
