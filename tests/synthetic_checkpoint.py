"""Write a random Llama 3.2 Vision checkpoint in the published Hugging Face layout, with numpy only.

Tests use it for shapes the committed fixtures do not have (widths that are multiples of 256 for the
k-quants); benchmarks use it at real 11B widths. The tokenizer is Llama 3's byte-level BPE reduced
to its 256 byte tokens and a few merges, plus the 256 Llama 3 special tokens and `<|image|>`.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from models.mllama import weights as W
from models.mllama.hparams import TextHParams, VisionHParams

LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
# Llama 3.2 Vision's template, less its system-date and tool parts: an image part becomes <|image|>.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
                 "<|end_header_id|>\n\n{% if message['content'] is string %}{{ message['content'] | trim }}"
                 "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<|image|>"
                 "{% else %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def small_config(hidden: int = 256, vision_hidden: int = 64, vocab_size: int = 768) -> dict[str, Any]:
    """A tiny mllama config; widths default to multiples of 256 so every k-quant applies."""
    first_special = vocab_size - len(LLAMA3_SPECIALS)
    return {
        "model_type": "mllama",
        "architectures": ["MllamaForConditionalGeneration"],
        "image_token_index": vocab_size,
        "text_config": {
            "model_type": "mllama_text_model", "vocab_size": vocab_size, "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": 4, "cross_attention_layers": [1],
            "num_attention_heads": hidden // 64, "num_key_value_heads": max(1, hidden // 128),
            "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 256},
            "bos_token_id": first_special, "eos_token_id": [first_special + 1, first_special + 8, first_special + 9],
            "pad_token_id": first_special + 4,
        },
        "vision_config": {
            "model_type": "mllama_vision_model", "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": 2, "num_global_layers": 1, "attention_heads": 2,
            "intermediate_layers_indices": [0], "vision_output_dim": 2 * vision_hidden, "image_size": 28,
            "patch_size": 14, "max_num_tiles": 4, "norm_eps": 1e-5, "num_channels": 3,
            "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        },
    }


def eleven_b_config(text_layers: int, cross_layers: list[int], vision_layers: int,
                    global_layers: int) -> dict[str, Any]:
    """Real Llama 3.2 11B Vision widths at a reduced depth."""
    config = small_config()
    config["image_token_index"] = 128256
    config["text_config"].update({
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": text_layers, "cross_attention_layers": cross_layers,
        "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
    })
    config["text_config"]["rope_parameters"]["original_max_position_embeddings"] = 8192
    config["vision_config"].update({
        "hidden_size": 1280, "intermediate_size": 5120, "attention_heads": 16, "num_hidden_layers": vision_layers,
        "num_global_layers": global_layers, "intermediate_layers_indices": list(range(min(5, vision_layers))),
        "vision_output_dim": 1280 * (1 + min(5, vision_layers)), "image_size": 560,
    })
    return config


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for every tensor of an mllama checkpoint with this config."""
    t, v = TextHParams.from_hf(config["text_config"]), VisionHParams.from_hf(config["vision_config"])
    h, f, hd = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    vh, vf, tiles, patches = v.hidden_size, v.intermediate_size, v.max_num_tiles, v.num_patches
    ratios = len(v.supported_aspect_ratios) + 1
    by_field: dict[type, dict[str, tuple[int, ...]]] = {
        W.TextModel: {"token_embd": (t.vocab_size + 8, h), "output_norm": (h,), "output": (t.vocab_size, h)},
        W.SelfAttentionLayer: {"attn_norm": (h,), "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h),
                               "attn_output": (h, q), "ffn_norm": (h,), "ffn_gate": (f, h), "ffn_up": (f, h),
                               "ffn_down": (h, f)},
        W.CrossAttentionLayer: {"attn_norm": (h,), "attn_q": (q, h), "attn_q_norm": (hd,), "attn_k": (kv, h),
                                "attn_k_norm": (hd,), "attn_v": (kv, h), "attn_output": (h, q), "attn_gate": (1,),
                                "ffn_norm": (h,), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f),
                                "mlp_gate": (1,)},
        W.VisionEmbeddings: {"patch_embd": (vh, v.num_channels, v.patch_size, v.patch_size), "class_embd": (vh,),
                             "pre_tile_embd": (ratios, tiles * vh), "pre_tile_gate": (1,),
                             "position_embd": (patches, vh), "tile_position_embd": (ratios, tiles * patches * vh),
                             "position_gate": (1,), "pre_norm": (vh,), "pre_norm_bias": (vh,), "post_norm": (vh,),
                             "post_norm_bias": (vh,), "post_tile_embd": (ratios, tiles * vh), "post_tile_gate": (1,)},
        W.VisionLayer: {"attn_norm": (vh,), "attn_norm_bias": (vh,), "attn_q": (vh, vh), "attn_k": (vh, vh),
                        "attn_v": (vh, vh), "attn_output": (vh, vh), "ffn_norm": (vh,), "ffn_norm_bias": (vh,),
                        "ffn_up": (vf, vh), "ffn_up_bias": (vf,), "ffn_down": (vh, vf), "ffn_down_bias": (vh,)},
        W.Projector: {"weight": (h, v.vision_output_dim), "bias": (h,)},
    }
    by_field[W.GlobalVisionLayer] = {**by_field[W.VisionLayer], "attn_gate": (1,), "ffn_gate": (1,)}
    blocks = [(W.TextModel, "", ""), (W.VisionEmbeddings, "", W.VISION_HF_PREFIX), (W.Projector, "", "")]
    blocks += [(W.SelfAttentionLayer, *W.self_attention_prefixes(j, i)) for j, i in enumerate(t.self_attention_layers)]
    blocks += [(W.CrossAttentionLayer, *W.cross_attention_prefixes(i)) for i in t.cross_attention_layers]
    blocks += [(W.VisionLayer, *W.vision_layer_prefixes(i)) for i in range(v.num_hidden_layers)]
    blocks += [(W.GlobalVisionLayer, *W.global_vision_layer_prefixes(i)) for i in range(v.num_global_layers)]
    return {name.hf: by_field[block][name.field]
            for block, gguf_prefix, hf_prefix in blocks
            for name in W.names(block, gguf_prefix, hf_prefix) if name.hf is not None}


def write_checkpoint(directory: Path, config: dict[str, Any], seed: int = 0, shard_bytes: int = 0,
                     zero_cross_attention_gates: bool = False, outlier_channels: tuple[int, ...] = ()) -> Path:
    """Random bf16 weights (norms near 1, gates non-zero) plus every file a published checkpoint has.

    `zero_cross_attention_gates` closes both gates of every cross-attention layer, as at the start of
    Meta's vision training: the model then is the text model, whatever the image. `outlier_channels` are
    residual channels that every local vision layer's fc2 writes 30x larger, as trained ViTs have (a few
    channels of their residual stream far larger than the rest): the worst case for low-precision
    arithmetic, whose scales those channels set.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(config)
    shards = _split(list(shapes), shapes, shard_bytes)
    weight_map = {}
    for n, names in enumerate(shards):
        file_name = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(directory / file_name, {name: shapes[name] for name in names}, rng,
                           zero_cross_attention_gates, outlier_channels)
        weight_map.update({name: file_name for name in names})
    if len(shards) > 1:
        total_size = sum(2 * int(np.prod(shape)) for shape in shapes.values())       # bf16, as published indexes say
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total_size},
                                                                            "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(directory, config["text_config"]["vocab_size"])
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_normalize": True,
        "do_pad": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.45, 0.4],
        "image_std": [0.22, 0.25, 0.28], "max_image_tiles": config["vision_config"]["max_num_tiles"],
        "resample": 2, "rescale_factor": 1 / 255,
        "size": {"height": config["vision_config"]["image_size"], "width": config["vision_config"]["image_size"]},
    }))
    text = config["text_config"]
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"]}))
    (directory / "README.md").write_text("---\nlicense: llama3.2\n---\nA synthetic checkpoint with random weights.\n")
    return directory


def _split(names: list[str], shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    if not shard_bytes:
        return [names]
    shards, size = [[]], 0
    for name in names:
        nbytes = 2 * int(np.prod(shapes[name]))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


CROSS_ATTENTION_GATES = tuple(n.hf for n in W.names(W.CrossAttentionLayer) if n.field in ("attn_gate", "mlp_gate"))


def _random_values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if shape == (1,):                                  # the tanh gates: non-zero, both signs
        return (rng.uniform(0.3, 1.0, size=shape) * rng.choice([-1, 1], size=shape)).astype(np.float32)
    if len(shape) == 1 and "norm" in name and name.endswith("weight"):
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        return 0.1 * rng.standard_normal(shape, dtype=np.float32)
    scale = 1.0 if "embed" in name or "embedding" in name else 1.0 / np.sqrt(shape[-1])
    return scale * rng.standard_normal(shape, dtype=np.float32)


OUTLIER_SCALE = 30.0
LOCAL_FC2 = re.compile(re.escape(W.VISION_HF_PREFIX) + r"transformer\.layers\.\d+\.mlp\.fc2\.weight$")


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator,
                       zero_cross_attention_gates: bool = False, outlier_channels: tuple[int, ...] = ()) -> None:
    """bf16 tensors, generated and written one at a time so memory stays at one tensor."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            values = _random_values(name, shape, rng).astype(np.float32)
            if zero_cross_attention_gates and name.endswith(CROSS_ATTENTION_GATES):
                values = np.zeros_like(values)
            if outlier_channels and LOCAL_FC2.search(name):
                values[list(outlier_channels)] *= OUTLIER_SCALE
            f.write((values.view(np.uint32) >> 16).astype(np.uint16).tobytes())


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (what byte-level BPE vocabularies hold)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("Ġt", "he"), ("Ġ", "a")]


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    vocab = {token: i for i, token in enumerate(_byte_tokens())}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    first_special = vocab_size - len(LLAMA3_SPECIALS)
    added = [{"id": first_special + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(LLAMA3_SPECIALS + ["<|image|>"])]
    tokenizer = {
        "version": "1.0", "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                                   "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                                                   "\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                               "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in MERGES]},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 131072,
    }))
