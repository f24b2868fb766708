"""Write an Ollama model store from a Hugging Face mllama checkpoint, the way Ollama's own code does.

The import tests need the files Ollama's converter wrote for llama3.2-vision, and there is no Ollama here.
This follows ollama/ollama's Go source transform by transform; each step names its Go function. Read at
tags v0.7.0 and v0.7.1 (the converter changed between them, #10716 and #10807) and, for the store layout,
at 9db4bdbad^ (the parent of the commit that removed the mllama engine). docs/OLLAMA.md has the details.
It shares no code with `convert/ollama/` (the importer under test): names come from Go's replacer rules
below, not from lva's tensor tables, so a wrong name in either shows up as a failed import.

    write_model(store, checkpoint, "llama3.2-vision:11b", converter="v0.7.1", file_type="Q4_K_M")

`file_type` says which of Ollama's files: "F16" as v0.7.0 to v0.11.0 wrote every file (matrices F16), "BF16"
as v0.15.5 and later wrote one from a BF16 checkpoint such as Meta's (text matrices BF16, vision F16; kind()
says what changed in between), "Q8_0" and "Q4_K_M" quantized from the F16 file as `ollama create -q` (and the
registry's files) did. Every unquantized file says general.file_type = 1 (F16), as Ollama's converter wrote
whatever the tensors.
Deviation, on purpose: `file_type="F32"` keeps every tensor in F32 where Ollama's Kind() writes matrices as
F16 or BF16; it isolates the import's own exactness from rounding. Its general.file_type is 1 too.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from models import ggml  # ggml's own quantizer (ggml_quantize_chunk), which Ollama's Quantize calls too

CONVERTERS = ("v0.7.0", "v0.7.1")
MODEL = "application/vnd.ollama.image.model"
PROJECTOR = "application/vnd.ollama.image.projector"
TEMPLATE = "application/vnd.ollama.image.template"
PARAMS = "application/vnd.ollama.image.params"
LICENSE = "application/vnd.ollama.image.license"
CONFIG = "application/vnd.docker.container.image.v1+json"

# Ollama's Go template for llama3.2-vision is kept in its own layer; lva never runs it.
GO_TEMPLATE = ('{{- range $index, $_ := .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
               '{{ .Content }}{{- if gt (len (slice $.Messages $index)) 1 }}<|eot_id|>{{- else }}<|eot_id|>'
               '<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}{{- end }}')

# llamaModel.Replacements() then mllamaModel.Replacements() (convert_llama.go, convert_mllama.go).
LLAMA_REPLACEMENTS = [
    ("lm_head", "output"), ("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"),
    ("model.layers", "blk"), ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"), ("mlp.down_proj", "ffn_down"), ("mlp.up_proj", "ffn_up"),
    ("post_attention_layernorm", "ffn_norm"),
]
MLLAMA_REPLACEMENTS = LLAMA_REPLACEMENTS + [
    ("language_model.", ""), ("gate_attn", "attn_gate"), ("gate_ffn", "ffn_gate"), ("cross_attn.", "cross_attn_"),
    ("vision_model", "v"), ("class_embedding", "class_embd"), ("patch_embedding", "patch_embd"),
    ("gated_positional_embedding.tile_embedding", "tile_position_embd"),
    ("gated_positional_embedding.embedding", "position_embd.weight"),
    ("gated_positional_embedding", "position_embd"), ("embedding.weight", "weight"),
    ("pre_tile_positional_embedding", "pre_tile_position_embd"),
    ("post_tile_positional_embedding", "post_tile_position_embd"), ("layernorm_pre", "pre_ln"),
    ("layernorm_post", "post_ln"), ("global_transformer.layers", "global.blk"), ("transformer.layers", "blk"),
    ("mlp.fc1", "ffn_up"), ("mlp.fc2", "ffn_down"), ("multi_modal_projector", "mm.0"),
]
# tokenizer.go parseTokenizer: the sha256 of Llama 3's Split regex names the pre-tokenizer.
LLAMA_BPE_DIGEST = "d98f9631be1e9607a9848c26c1f9eac1aa9fc21ac6ba82a2fc0741af9780a48f"
SPECIAL_TOKEN_TYPES = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"]   # ModelParameters.specialTokenTypes
SPECIAL_KEYS = {"unk": "unknown", "sep": "seperator", "pad": "padding"}     # SpecialVocabulary.Key (sic)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
UNQUANTIZED = ("F32", "F16", "BF16")
FILE_TYPES = {"Q8_0": 7, "Q4_K_M": 15}                                      # fs/ggml FileType
QUANT_DEFAULT = {"Q8_0": T.Q8_0, "Q4_K_M": T.Q4_K}                          # FileType.ToTensorType
QUANT_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}           # getTensorNewType, v0.7.1


@dataclass
class OllamaTensor:
    """ggml.Tensor as convert's Tensors() returns it: a name, a Kind and float32 data in numpy order."""

    name: str
    kind: T
    data: np.ndarray


def go_replace(name: str, pairs: list[tuple[str, str]]) -> str:
    """strings.NewReplacer(pairs...).Replace: left to right, at each position the first old string (in argument
    order) that matches is replaced, and scanning goes on after it."""
    out, i = [], 0
    while i < len(name):
        for old, new in pairs:
            if name.startswith(old, i):
                out.append(new)
                i += len(old)
                break
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def read_safetensors(checkpoint: Path) -> dict[str, np.ndarray]:
    """parseSafetensors + safetensor.WriteTo's decoding: every *.safetensors file, keys sorted, as float32."""
    tensors = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        for key in sorted(k for k in header if k != "__metadata__"):
            info = header[key]
            start, stop = (8 + n + offset for offset in info["data_offsets"])
            raw = np.frombuffer(data[start:stop], dtype=np.uint8)
            if info["dtype"] == "BF16":       # bfloat16.DecodeFloat32
                values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] == "F16":
                values = raw.view(np.float16).astype(np.float32)
            else:
                values = raw.view(np.float32)
            tensors[key] = values.reshape(info["shape"] or [1])
    return tensors


def as_transformers_4_45(config: dict[str, Any]) -> dict[str, Any]:
    """Ollama's Go structs read the config layout the published checkpoints carry (`rope_theta`, `rope_scaling`);
    transformers 5 saves `rope_parameters` instead, as tiny-a and tiny-c were saved."""
    text = dict(config["text_config"])
    if "rope_parameters" in text:
        rope = dict(text.pop("rope_parameters"))
        text["rope_theta"] = rope.pop("rope_theta")
        text["rope_scaling"] = rope
    return {**config, "text_config": text}


# ------------------------------------------------------------------------------------------ KV (metadata)


def tokenizer_kv(checkpoint: Path, converter: str, vocab_size: int) -> dict[str, tuple[Any, V, V | None]]:
    """ModelParameters.KV(t) after parseTokenizer (tokenizer.go): vocabulary, merges, pre, template, specials."""
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    # parseVocabularyFromTokenizer: vocab + added tokens sorted by id; score = id; special -> control.
    tokens = {i: (text, TOKEN_NORMAL) for text, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer["added_tokens"]:
        tokens[added["id"]] = (added["content"], TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED)
    ids = sorted(tokens)
    texts, types = [tokens[i][0] for i in ids], [tokens[i][1] for i in ids]
    scores = [float(i) for i in ids]
    # LoadModelMetadata (convert.go): a vocabulary shorter than the config's vocab_size is padded.
    for i in range(vocab_size - len(texts)):
        texts.append(f"[PAD{i}]")
        scores.append(-1.0)
        types.append(TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    digest = hashlib.sha256("".join(p["pattern"]["Regex"] for p in tokenizer["pre_tokenizer"]["pretokenizers"]
                                    if p["type"] == "Split" and p["pattern"].get("Regex")).encode()).hexdigest()
    kv = {
        "general.file_type": (1, V.UINT32, None),
        "general.quantization_version": (2, V.UINT32, None),
        "tokenizer.ggml.pre": ("llama-bpe" if digest == LLAMA_BPE_DIGEST else "default", V.STRING, None),
        "tokenizer.ggml.model": ("gpt2", V.STRING, None),
        "tokenizer.ggml.tokens": (texts, V.ARRAY, V.STRING),
        "tokenizer.ggml.scores": (scores, V.ARRAY, V.FLOAT32),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
    }
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    if config.get("chat_template"):
        kv["tokenizer.chat_template"] = (config["chat_template"], V.STRING, None)
    added_ids = {a["content"]: a["id"] for a in tokenizer["added_tokens"]}
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    for kind in SPECIAL_TOKEN_TYPES:
        content = config.get(f"{kind}_token")
        content = content.get("content") if isinstance(content, dict) else content
        if content not in added_ids:
            continue
        key = SPECIAL_KEYS.get(kind, kind)
        kv[f"tokenizer.ggml.add_{key}_token"] = (bool(config.get(f"add_{kind}_token", False)), V.BOOL, None)
        kv[f"tokenizer.ggml.{key}_token_id"] = (added_ids[content], V.UINT32, None)
        listed = generation.get(f"{kind}_token_id")
        if converter != "v0.7.0" and isinstance(listed, list):   # v0.7.1: IDs from generation_config.json
            kv[f"tokenizer.ggml.{key}_token_ids"] = (listed, V.ARRAY, V.INT32)
    return kv


def rope_factors(text: dict[str, Any]) -> np.ndarray | None:
    """llamaModel.KV's llama3 branch: one divisor per rotary pair, float32 math as the Go code does it."""
    scaling = text.get("rope_scaling") or {}
    if scaling.get("rope_type") != "llama3":
        return None
    f32 = np.float32
    dim = text["hidden_size"] // text["num_attention_heads"]
    factor, low, high = f32(scaling.get("factor") or 8), f32(scaling.get("low_freq_factor") or 1), \
        f32(scaling.get("high_freq_factor") or 4)
    original = f32(scaling.get("original_max_position_embeddings") or 8192)
    lambda_low, lambda_high = f32(original / low), f32(original / high)
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * math.pow(float(f32(text["rope_theta"])), i / dim)
        if wavelength < float(lambda_high):
            factors.append(f32(1))
        elif wavelength > float(lambda_low):
            factors.append(factor)
        else:
            smooth = f32(f32(original / f32(wavelength)) - low) / f32(high - low)
            factors.append(f32(1) / f32(f32(f32(1) - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def mllama_kv(config: dict[str, Any]) -> dict[str, tuple[Any, V, V | None]]:
    """mllamaModel.KV: llamaModel.KV's llama.* keys renamed mllama.*, the cross layers and the vision keys."""
    text, vision = config["text_config"], config["vision_config"]
    u32 = lambda value: (int(value), V.UINT32, None)  # noqa: E731
    kv = {"general.architecture": ("mllama", V.STRING, None), "mllama.vocab_size": u32(text["vocab_size"]),
          "mllama.block_count": u32(text["num_hidden_layers"]),
          "mllama.context_length": u32(text["max_position_embeddings"]),
          "mllama.embedding_length": u32(text["hidden_size"]),
          "mllama.feed_forward_length": u32(text["intermediate_size"]),
          "mllama.attention.head_count": u32(text["num_attention_heads"]),
          "mllama.rope.dimension_count": u32(text["hidden_size"] // text["num_attention_heads"]),
          "mllama.rope.freq_base": (float(text["rope_theta"]), V.FLOAT32, None),
          "mllama.attention.head_count_kv": u32(text["num_key_value_heads"]),
          "mllama.attention.layer_norm_rms_epsilon": (float(text["rms_norm_eps"]), V.FLOAT32, None),
          "mllama.attention.cross_attention_layers": (text["cross_attention_layers"], V.ARRAY, V.INT32),
          "mllama.vision.block_count": u32(vision["num_hidden_layers"]),
          "mllama.vision.global.block_count": u32(vision["num_global_layers"]),
          "mllama.vision.intermediate_layers_indices": (vision["intermediate_layers_indices"], V.ARRAY, V.INT32),
          "mllama.vision.embedding_length": u32(vision["hidden_size"]),
          "mllama.vision.feed_forward_length": u32(vision["intermediate_size"]),
          "mllama.vision.attention.head_count": u32(vision["attention_heads"]),
          "mllama.vision.attention.layer_norm_epsilon": (float(vision["norm_eps"]), V.FLOAT32, None),
          "mllama.vision.image_size": u32(vision["image_size"]), "mllama.vision.patch_size": u32(vision["patch_size"]),
          "mllama.vision.max_num_tiles": u32(vision["max_num_tiles"]),
          "mllama.vision.num_channels": u32(vision["num_channels"])}
    return kv


# ------------------------------------------------------------------------------------------ tensors


def kind(name: str, shape: tuple[int, ...], file_type: str) -> T:
    """tensorBase.Kind (convert/reader.go, v0.7.1): these embeddings and every 1-D tensor F32, the rest F16.

    "BF16": safetensor.Kind on a BF16 checkpoint (convert/reader_safetensors.go, v0.15.5 to the removal
    9db4bdbad^; v0.11.1 made every such matrix BF16, v0.12.0 kept `v.` F16, v0.15.5 `mm.` too), with
    reader.go's longer always-F32 list of those versions (biases, `v.position_embd.weight`).
    """
    always_f32 = name.endswith(".ffn_gate_inp.weight") or name in (
        "token_types.weight", "v.positional_embedding_vlm", "v.tile_position_embd.weight",
        "v.pre_tile_position_embd.weight", "v.post_tile_position_embd.weight")
    if file_type == "BF16":
        always_f32 = always_f32 or name.endswith(".bias") or name == "v.position_embd.weight"
    if always_f32 or len(shape) == 1 or file_type == "F32":
        return T.F32
    if file_type == "BF16" and not name.startswith(("v.", "mm.")):
        return T.BF16
    return T.F16


def permute_heads(data: np.ndarray, heads: int) -> np.ndarray:
    """llamaModel.repack and mllamaModel.repack's q/k branch: Reshape(heads, 2, dim0/heads/2, ...), T(0, 2, 1, 3)."""
    shape = data.shape
    return data.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def tanh32(data: np.ndarray) -> np.ndarray:
    """tensor.Tanh on a float32 tensor."""
    return np.tanh(data.astype(np.float64)).astype(np.float32)


def mllama_tensors(config: dict[str, Any], hf: dict[str, np.ndarray], converter: str,
                   file_type: str) -> list[OllamaTensor]:
    """mllamaModel.Tensors, with its repack, then llamaModel.Tensors for the text part."""
    text, vision = config["text_config"], config["vision_config"]
    out: list[OllamaTensor] = []
    text_tensors: list[tuple[str, np.ndarray]] = []
    for key, data in hf.items():
        name = go_replace(key, MLLAMA_REPLACEMENTS)       # parseTensors with the model's Replacements
        if not name.startswith("v.") and not name.startswith("mm."):
            text_tensors.append((name, data))
        elif name == "v.position_embd.gate":
            # The position gate becomes two tensors: 1 - tanh(gate) and tanh(gate) (repack's Tanh, Sub).
            out.append(OllamaTensor(name, T.F32, np.float32(1) - tanh32(data)))
            out.append(OllamaTensor("v.tile_position_embd.gate", T.F32, tanh32(data)))
        else:
            if name in ("v.pre_tile_position_embd.gate", "v.post_tile_position_embd.gate"):
                data = tanh32(data)
            elif converter != "v0.7.0" and name.endswith(("attn_q.weight", "attn_k.weight")):
                data = permute_heads(data, vision["attention_heads"])        # #10807: swap attention heads
            elif converter != "v0.7.0" and name.endswith(("attn_gate", "ffn_gate")):
                data = tanh32(data)                                          # #10807: transform the gates
            out.append(OllamaTensor(name, kind(name, data.shape, file_type), data))
    # llamaModel.Tensors: rope_freqs first, then q/k permuted for llama.cpp's RoPE layout (heads swapped).
    factors = rope_factors(text)
    if factors is not None:
        out.append(OllamaTensor("rope_freqs.weight", T.F32, factors))
    suffixes = ("attn_q.weight", "attn_k.weight") + (() if converter == "v0.7.0" else
                                                     ("attn_q_proj.weight", "attn_k_proj.weight"))   # #10716
    for name, data in text_tensors:
        if name.endswith(suffixes):
            q = name.endswith(("attn_q.weight", "attn_q_proj.weight"))
            data = permute_heads(data, text["num_attention_heads"] if q else text["num_key_value_heads"])
        out.append(OllamaTensor(name, kind(name, data.shape, file_type), data))
    return out


def block(name: str) -> int:
    """Tensor.block (fs/ggml/ggml.go): the N of `blk.N.`, other tensors last."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else 1 << 62


def quantized_kind(t: OllamaTensor, state: dict[str, int], file_type: str) -> T:
    """newType and getTensorNewType (server/quantization.go at v0.7.1, the version of the registry's files).

    The branches for experts (`expert_count`), Q4_K_S and attn_qkv never apply to mllama and are left out.
    """
    name, shape = t.name, tuple(reversed(t.data.shape))       # ggml order: shape[0] is the row length
    quantize = name.endswith("weight")
    quantize = quantize and ("v." not in name or "_v." in name)   # "don't quantize vision stuff" (but attn_v)
    quantize = quantize and "mm." not in name and len(shape) >= 2 and "_norm.weight" not in name
    quantize = quantize and "ffn_gate_inp.weight" not in name and name not in ("position_embd.weight",
                                                                              "token_types.weight")
    if not quantize:
        return t.kind
    wanted = QUANT_DEFAULT[file_type]
    if name in ("output.weight", "output_norm.weight"):       # token_embd: hasOutput, so it takes the default
        wanted = T.Q8_0 if shape[0] % ggml.block_size(wanted) else (T.Q6_K if wanted != T.Q8_0 else wanted)
    elif "attn_v.weight" in name:
        if file_type == "Q4_K_M" and use_more_bits(state["i_attn_v"], state["n_attn_v"]):
            wanted = T.Q6_K
        state["i_attn_v"] += 1
    elif "ffn_down" in name:
        if file_type == "Q4_K_M" and use_more_bits(state["i_ffn_down"], state["n_ffn_down"]):
            wanted = T.Q6_K
        state["i_ffn_down"] += 1
    if shape[0] % ggml.block_size(wanted):
        wanted = QUANT_FALLBACK.get(wanted, wanted)
        if shape[0] % ggml.block_size(wanted):
            wanted = T.F16
    return wanted


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def quantize(tensors: list[OllamaTensor], file_type: str) -> list[tuple[str, T, np.ndarray]]:
    """quantize (server/quantization.go): the F16 file's tensors, in file order, to the file type's mix.

    The counts come from the whole file: every `attn_v.weight` (vision ones too) and every `blk.N` group.
    File order: v0.7.1's WriteGGUF sorted with a comparator that is not a consistent order around blk.0
    (block() is -1 for other tensors), so where Go's stable sort put the vision attn_v tensors among the
    text ones depended on its merge steps; this uses the consistent order of later versions (block, then
    name). It can move which attn_v tensors useMoreBits bumps to Q6_K; the importer copies whatever it finds.
    """
    state = {"n_attn_v": sum("attn_v.weight" in t.name for t in tensors), "i_attn_v": 0,
             "n_ffn_down": len({t.name.split(".")[1] for t in tensors if t.name.startswith("blk.")}), "i_ffn_down": 0}
    out = []
    for t in tensors:
        stored = t.data.astype(np.float16).astype(np.float32) if t.kind == T.F16 else t.data   # ConvertToF32
        wanted = quantized_kind(t, state, file_type)
        if wanted in (T.F32, T.F16):
            out.append((t.name, wanted, stored))
        else:
            rows = stored.reshape(-1, stored.shape[-1])
            out.append((t.name, wanted, ggml.quantize_rows(rows, wanted)))              # ggml.Quantize
    return out


# ------------------------------------------------------------------------------------------ the GGUF file


def write_gguf(path: Path, kv: dict[str, tuple[Any, V, V | None]], tensors: list[tuple[str, T, np.ndarray]]) -> None:
    """WriteGGUF (fs/ggml/gguf.go): keys sorted; tensors sorted by block then name; shapes in ggml order."""
    writer = gguf.GGUFWriter(path, arch=str(kv["general.architecture"][0]))
    writer.kv_data[0].clear()                        # GGUFWriter adds general.architecture itself; Ollama sorts it
    for key in sorted(kv):
        value, value_type, sub_type = kv[key]
        writer.add_key_value(key, value, value_type, sub_type)
    for name, qtype, data in sorted(tensors, key=lambda t: (block(t[0]), t[0])):
        if qtype in (T.F32, T.F16):
            writer.add_tensor(name, data.astype(np.float32 if qtype == T.F32 else np.float16))
        elif qtype == T.BF16:
            writer.add_tensor(name, bfloat16_bytes(data), raw_dtype=qtype)
        else:                                        # quantized rows: uint8 [n_rows, row_bytes]
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def bfloat16_bytes(data: np.ndarray) -> np.ndarray:
    """bfloat16.EncodeFloat32 of values read from a BF16 checkpoint (repacks only move them): the top half of
    each float32, exactly; as uint8 [..., 2 * row_length]."""
    bits = data.astype(np.float32).view(np.uint32)
    assert not np.any(bits & 0xFFFF), "the checkpoint is not BF16"
    return (bits >> 16).astype(np.uint16).view(np.uint8)


def convert_model(checkpoint: Path, path: Path, converter: str = "v0.7.1", file_type: str = "F16") -> None:
    """ConvertModel (convert/convert.go), then quantize for Q8_0 / Q4_K_M, as `ollama create -q` does."""
    assert converter in CONVERTERS and file_type in UNQUANTIZED + tuple(QUANT_DEFAULT)
    config = as_transformers_4_45(json.loads((checkpoint / "config.json").read_text()))
    kv = {**tokenizer_kv(checkpoint, converter, config["text_config"]["vocab_size"]), **mllama_kv(config)}
    tensors = mllama_tensors(config, read_safetensors(checkpoint), converter, file_type)
    if file_type in QUANT_DEFAULT:
        in_file_order = sorted(tensors, key=lambda t: (block(t.name), t.name))
        kv["general.file_type"] = (FILE_TYPES[file_type], V.UINT32, None)
        write_gguf(path, kv, quantize(in_file_order, file_type))
    else:                                            # ModelParameters.KV's general.file_type, 1, stays
        write_gguf(path, kv, [(t.name, t.kind, t.data) for t in tensors])


# ------------------------------------------------------------------------------------------ the store


def add_blob(store: Path, data: bytes) -> dict[str, Any]:
    """NewLayer (manifest/layer.go): content-addressed in blobs/sha256-<hex>; the digest says sha256:<hex>."""
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_manifest(store: Path, name: str, layers: list[tuple[str, bytes]], families: list[str],
                   file_type: str) -> Path:
    """WriteManifest: manifests/<host>/<namespace>/<model>/<tag> naming a config blob and the layers."""
    model, _, tag = name.partition(":")
    entries = [{"mediaType": media_type, **add_blob(store, data)} for media_type, data in layers]
    config = {"model_format": "gguf", "model_family": families[0], "model_families": families,
              "model_type": "tiny", "file_type": file_type, "architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [e["digest"] for e in entries]}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": CONFIG, **add_blob(store, json.dumps(config).encode())},
                "layers": entries}
    path = store / "manifests" / "registry.ollama.ai" / "library" / model / (tag or "latest")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def write_model(store: Path, checkpoint: Path, name: str = "llama3.2-vision:latest", converter: str = "v0.7.1",
                file_type: str = "F16") -> Path:
    """A current-format (v0.7.0+) llama3.2-vision in `store`; returns its model blob."""
    blob = store / "model.gguf.tmp"
    store.mkdir(parents=True, exist_ok=True)
    convert_model(checkpoint, blob, converter, file_type)
    data = blob.read_bytes()
    blob.unlink()
    write_manifest(store, name, [(MODEL, data), (TEMPLATE, GO_TEMPLATE.encode()),
                                 (LICENSE, b"LLAMA 3.2 COMMUNITY LICENSE AGREEMENT\n"),
                                 (PARAMS, json.dumps({"temperature": 0.6, "top_p": 0.9}).encode())],
                   ["mllama"], "F16" if file_type in UNQUANTIZED else file_type)
    return store / "blobs" / f"sha256-{hashlib.sha256(data).hexdigest()}"


def write_other_model(store: Path, name: str, gguf_file: Path, families: list[str],
                      projector: Path | None = None) -> Path:
    """A model whose blob is `gguf_file` (and a projector blob, as Ollama's legacy v0.4-v0.6 mllama had)."""
    layers = [(MODEL, gguf_file.read_bytes())]
    if projector is not None:
        layers.append((PROJECTOR, projector.read_bytes()))
    return write_manifest(store, name, layers + [(TEMPLATE, GO_TEMPLATE.encode())], families, "F16")
