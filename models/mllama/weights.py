"""The weights of Llama 3.2 Vision, block by block: each field names its GGUF tensor and its sources.

Like Ollama's Go model structs, a block is a dataclass whose fields are the tensors it holds; the
field's metadata says where the tensor lives in our GGUF files, in a published HF checkpoint and in
the single GGUF Ollama wrote for `mllama` since v0.7.0 (its `convert_mllama.go` names; docs/OLLAMA.md).
The converter and the Ollama importer walk these tables to write the files; the runtime fills the
same dataclasses from GGUF. A name written anywhere else is a bug waiting.

`{i}` in a name is the block index: the HF stack index for `layers.{i}`, our own numbering in GGUF
(the text file renumbers the self-attention layers 0..n-1 as llama.cpp expects; cross layers keep
their HF stack index so the runtime knows where each one goes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Iterator


class Kind(enum.Enum):
    """How a tensor is stored; decides which quantization it may take."""

    MATRIX = "matrix"          # a linear layer's weight: takes the tower's quant type
    VECTOR = "vector"          # norms, biases, gates, class token: always F32
    TABLE = "table"            # learned position / tile embeddings: F32 or F16, looked up by row
    CONV = "conv"              # the patch convolution kernel: F32 or F16 (ggml's im2col wants those)


def tensor(gguf: str, hf: str | None, kind: Kind = Kind.MATRIX, ollama: str | None = None) -> Any:
    """Declare a tensor field: `gguf`, `hf` and `ollama` are names relative to the block's prefixes.

    `ollama` defaults to `gguf`: most of Ollama's names are llama.cpp's, as ours are.
    """
    return field(default=None, metadata={"gguf": gguf, "hf": hf, "kind": kind, "ollama": ollama or gguf})


@dataclass(frozen=True)
class WeightName:
    """One tensor of one block, with its names resolved."""

    field: str
    gguf: str
    hf: str | None
    kind: Kind
    ollama: str


def names(block: type, gguf_prefix: str = "", hf_prefix: str = "", ollama_prefix: str = "") -> Iterator[WeightName]:
    """Resolve the names of every tensor of `block` under the given prefixes."""
    for f in fields(block):
        hf = f.metadata["hf"]
        yield WeightName(
            field=f.name,
            gguf=gguf_prefix + f.metadata["gguf"],
            hf=None if hf is None else hf_prefix + hf,
            kind=f.metadata["kind"],
            ollama=ollama_prefix + f.metadata["ollama"],
        )


def gguf_name(block: type, field_name: str, gguf_prefix: str = "") -> str:
    """The GGUF name of one field of `block` (a gate read as a number, say)."""
    return next(w.gguf for w in names(block, gguf_prefix) if w.field == field_name)


# ---------------------------------------------------------------- text file: a plain llama GGUF

TEXT_HF_PREFIX = "language_model.model."
EMBED_TOKENS_HF = TEXT_HF_PREFIX + "embed_tokens.weight"     # text vocab rows, then <|image|>, then padding


@dataclass
class TextModel:
    """llama.cpp's `llama` tensors outside the layers. `output` is HF's lm_head (vocab rows only)."""

    token_embd: Any = tensor("token_embd.weight", EMBED_TOKENS_HF, Kind.TABLE)
    output_norm: Any = tensor("output_norm.weight", TEXT_HF_PREFIX + "norm.weight", Kind.VECTOR)
    output: Any = tensor("output.weight", "language_model.lm_head.weight")
    rope_freqs: Any = tensor("rope_freqs.weight", None, Kind.VECTOR)    # computed from the llama3 rope


@dataclass
class SelfAttentionLayer:
    """A Llama 3.1 decoder layer (HF MllamaSelfAttentionDecoderLayer); frozen during vision training."""

    attn_norm: Any = tensor("attn_norm.weight", "input_layernorm.weight", Kind.VECTOR)
    attn_q: Any = tensor("attn_q.weight", "self_attn.q_proj.weight")
    attn_k: Any = tensor("attn_k.weight", "self_attn.k_proj.weight")
    attn_v: Any = tensor("attn_v.weight", "self_attn.v_proj.weight")
    attn_output: Any = tensor("attn_output.weight", "self_attn.o_proj.weight")
    ffn_norm: Any = tensor("ffn_norm.weight", "post_attention_layernorm.weight", Kind.VECTOR)
    ffn_gate: Any = tensor("ffn_gate.weight", "mlp.gate_proj.weight")
    ffn_up: Any = tensor("ffn_up.weight", "mlp.up_proj.weight")
    ffn_down: Any = tensor("ffn_down.weight", "mlp.down_proj.weight")


def self_attention_prefixes(gguf_index: int, stack_index: int) -> tuple[str, str]:
    return f"blk.{gguf_index}.", f"{TEXT_HF_PREFIX}layers.{stack_index}."


def ollama_text_layer_prefix(stack_index: int) -> str:
    """Ollama keeps all text layers, self and cross, as `blk.N` under their HF stack index."""
    return f"blk.{stack_index}."


# ---------------------------------------------------------------- vision file


@dataclass
class CrossAttentionLayer:
    """A gated cross-attention layer of the decoder (HF MllamaCrossAttentionDecoderLayer).

    x += tanh(attn_gate) * o(attn(q_norm(q(norm(x))), k_norm(k(img)), v(img)))
    x += tanh(mlp_gate) * mlp(ffn_norm(x))
    """

    attn_norm: Any = tensor("attn_norm.weight", "input_layernorm.weight", Kind.VECTOR)
    attn_q: Any = tensor("attn_q.weight", "cross_attn.q_proj.weight", ollama="cross_attn_q_proj.weight")
    attn_q_norm: Any = tensor("attn_q_norm.weight", "cross_attn.q_norm.weight", Kind.VECTOR,
                              ollama="cross_attn_q_norm.weight")
    attn_k: Any = tensor("attn_k.weight", "cross_attn.k_proj.weight", ollama="cross_attn_k_proj.weight")
    attn_k_norm: Any = tensor("attn_k_norm.weight", "cross_attn.k_norm.weight", Kind.VECTOR,
                              ollama="cross_attn_k_norm.weight")
    attn_v: Any = tensor("attn_v.weight", "cross_attn.v_proj.weight", ollama="cross_attn_v_proj.weight")
    attn_output: Any = tensor("attn_output.weight", "cross_attn.o_proj.weight", ollama="cross_attn_o_proj.weight")
    attn_gate: Any = tensor("attn_gate", "cross_attn_attn_gate", Kind.VECTOR, ollama="cross_attn_attn_gate")
    ffn_norm: Any = tensor("ffn_norm.weight", "post_attention_layernorm.weight", Kind.VECTOR)
    ffn_gate: Any = tensor("ffn_gate.weight", "mlp.gate_proj.weight")
    ffn_up: Any = tensor("ffn_up.weight", "mlp.up_proj.weight")
    ffn_down: Any = tensor("ffn_down.weight", "mlp.down_proj.weight")
    mlp_gate: Any = tensor("mlp_gate", "cross_attn_mlp_gate", Kind.VECTOR, ollama="cross_attn_mlp_gate")


CROSS_ATTENTION_GGUF_PREFIX = "cross.blk."
# The fields of a cross layer that act on the image tokens only: they run once per image, to make its K/V.
IMAGE_SIDE_CROSS_TENSORS = ("attn_k", "attn_k_norm", "attn_v")


def cross_attention_prefixes(stack_index: int) -> tuple[str, str]:
    return f"{CROSS_ATTENTION_GGUF_PREFIX}{stack_index}.", f"{TEXT_HF_PREFIX}layers.{stack_index}."


def cross_layer_of(gguf_name: str) -> tuple[int | None, str | None]:
    """'cross.blk.8.attn_k.weight' -> (8, 'attn_k'); (None, None) for a tensor outside the cross layers."""
    if not gguf_name.startswith(CROSS_ATTENTION_GGUF_PREFIX):
        return None, None
    index, _, rest = gguf_name[len(CROSS_ATTENTION_GGUF_PREFIX):].partition(".")
    return int(index), next(w.field for w in names(CrossAttentionLayer) if w.gguf == rest)


VISION_HF_PREFIX = "vision_model."


@dataclass
class VisionEmbeddings:
    """Patch, class, position and tile embeddings and the two encoder-level layer norms.

    Ollama stores each gate through tanh; the position gate twice, as 1 - tanh (`v.position_embd.gate`)
    and as tanh (`v.tile_position_embd.gate`, named here): lva's files keep the raw gates.
    """

    patch_embd: Any = tensor("v.patch_embd.weight", "patch_embedding.weight", Kind.CONV)
    class_embd: Any = tensor("v.class_embd", "class_embedding", Kind.VECTOR)
    pre_tile_embd: Any = tensor("v.pre_tile_embd.weight", "pre_tile_positional_embedding.embedding.weight",
                                Kind.TABLE, ollama="v.pre_tile_position_embd.weight")
    pre_tile_gate: Any = tensor("v.pre_tile_gate", "pre_tile_positional_embedding.gate", Kind.VECTOR,
                                ollama="v.pre_tile_position_embd.gate")
    position_embd: Any = tensor("v.position_embd.weight", "gated_positional_embedding.embedding", Kind.TABLE)
    tile_position_embd: Any = tensor("v.tile_position_embd.weight",
                                     "gated_positional_embedding.tile_embedding.weight", Kind.TABLE)
    position_gate: Any = tensor("v.position_gate", "gated_positional_embedding.gate", Kind.VECTOR,
                                ollama="v.tile_position_embd.gate")
    pre_norm: Any = tensor("v.pre_norm.weight", "layernorm_pre.weight", Kind.VECTOR, ollama="v.pre_ln.weight")
    pre_norm_bias: Any = tensor("v.pre_norm.bias", "layernorm_pre.bias", Kind.VECTOR, ollama="v.pre_ln.bias")
    post_norm: Any = tensor("v.post_norm.weight", "layernorm_post.weight", Kind.VECTOR, ollama="v.post_ln.weight")
    post_norm_bias: Any = tensor("v.post_norm.bias", "layernorm_post.bias", Kind.VECTOR, ollama="v.post_ln.bias")
    post_tile_embd: Any = tensor("v.post_tile_embd.weight", "post_tile_positional_embedding.embedding.weight",
                                 Kind.TABLE, ollama="v.post_tile_position_embd.weight")
    post_tile_gate: Any = tensor("v.post_tile_gate", "post_tile_positional_embedding.gate", Kind.VECTOR,
                                 ollama="v.post_tile_position_embd.gate")


@dataclass
class VisionLayer:
    """A pre-norm ViT layer with LayerNorm and GELU MLP (HF MllamaVisionEncoderLayer)."""

    attn_norm: Any = tensor("attn_norm.weight", "input_layernorm.weight", Kind.VECTOR)
    attn_norm_bias: Any = tensor("attn_norm.bias", "input_layernorm.bias", Kind.VECTOR)
    attn_q: Any = tensor("attn_q.weight", "self_attn.q_proj.weight")
    attn_k: Any = tensor("attn_k.weight", "self_attn.k_proj.weight")
    attn_v: Any = tensor("attn_v.weight", "self_attn.v_proj.weight")
    attn_output: Any = tensor("attn_output.weight", "self_attn.o_proj.weight")
    ffn_norm: Any = tensor("ffn_norm.weight", "post_attention_layernorm.weight", Kind.VECTOR)
    ffn_norm_bias: Any = tensor("ffn_norm.bias", "post_attention_layernorm.bias", Kind.VECTOR)
    ffn_up: Any = tensor("ffn_up.weight", "mlp.fc1.weight")
    ffn_up_bias: Any = tensor("ffn_up.bias", "mlp.fc1.bias", Kind.VECTOR)
    ffn_down: Any = tensor("ffn_down.weight", "mlp.fc2.weight")
    ffn_down_bias: Any = tensor("ffn_down.bias", "mlp.fc2.bias", Kind.VECTOR)


@dataclass
class GlobalVisionLayer(VisionLayer):
    """A global-transformer layer: both branches scaled by tanh gates."""

    attn_gate: Any = tensor("attn_gate", "gate_attn", Kind.VECTOR)
    ffn_gate: Any = tensor("ffn_gate", "gate_ffn", Kind.VECTOR)


def vision_layer_prefixes(index: int) -> tuple[str, str]:
    """Ollama names the vision layers as lva does (`v.blk.N.`, `v.global.blk.N.`)."""
    return f"v.blk.{index}.", f"{VISION_HF_PREFIX}transformer.layers.{index}."


def global_vision_layer_prefixes(index: int) -> tuple[str, str]:
    return f"v.global.blk.{index}.", f"{VISION_HF_PREFIX}global_transformer.layers.{index}."


@dataclass
class Projector:
    """The linear map from vision features (final + intermediates) to the text width."""

    weight: Any = tensor("mm.weight", "multi_modal_projector.weight", ollama="mm.0.weight")
    bias: Any = tensor("mm.bias", "multi_modal_projector.bias", Kind.VECTOR, ollama="mm.0.bias")


@dataclass
class ImageToken:
    """The embedding of `<|image|>`: a row of HF's embed_tokens past the text vocabulary.

    The text file keeps a pure Llama vocabulary, so the runtime injects this row at the image token.
    Ollama keeps it as a row of its `token_embd.weight`.
    """

    embd: Any = tensor("image_token_embd.weight", EMBED_TOKENS_HF, Kind.VECTOR, ollama="token_embd.weight")
