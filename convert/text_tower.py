"""The text file: mllama's self-attention layers written as a plain llama.cpp `llama` GGUF.

Cross-attention layers are left out and the rest renumbered 0..n-1; llama3 RoPE scaling becomes
llama.cpp's `rope_freqs.weight`; Q and K rows are permuted from HF's half-split RoPE layout to the
interleaved one llama.cpp's `llama` architecture uses (as convert_hf_to_gguf does).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from convert.checkpoint import Checkpoint, source_name
from convert.gguf_output import PlannedTensor, Rows, add_metadata, write_gguf
from convert.quant_types import FLOAT_FTYPES, storage_type
from convert.tokenizer import Vocabulary, read_vocabulary
from models.mllama import gguf_keys as K
from models.mllama import weights as W
from models.mllama.hparams import TextHParams
from models.mllama.weights import Kind

ARCHITECTURE = "llama"


def checkpoint_rows(checkpoint: Checkpoint, hf_name: str, row_length: int) -> Rows:
    """Rows of a checkpoint tensor, read straight from its shard."""
    entry = checkpoint.entry(hf_name)
    return lambda start, stop: entry.read_flat(start * row_length, stop * row_length).reshape(-1, row_length)


def array_rows(array: np.ndarray) -> Rows:
    rows = np.asarray(array, dtype=np.float32).reshape(-1, array.shape[-1])
    return lambda start, stop: rows[start:stop]


def whole_tensor_rows(checkpoint: Checkpoint, hf_name: str, transform: Callable[[np.ndarray], np.ndarray]) -> Rows:
    """Rows of a tensor that must be transformed as a whole (RoPE permutation): loaded once, on demand."""
    entry = checkpoint.entry(hf_name)
    cache: dict[str, np.ndarray] = {}

    def rows(start: int, stop: int) -> np.ndarray:
        if "tensor" not in cache:
            cache["tensor"] = transform(entry.read_flat(0, entry.n_elements).reshape(entry.shape))
        block = cache["tensor"][start:stop]
        if stop >= len(cache["tensor"]):
            cache.clear()
        return block

    return rows


def rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary pairs as (first half, second half); llama.cpp wants them adjacent."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def source_float_type(checkpoint: Checkpoint) -> T:
    """The float type that holds the checkpoint's weights losslessly (the quantizer's input)."""
    dtype = checkpoint.entry(W.EMBED_TOKENS_HF).dtype
    return {"BF16": T.BF16, "F16": T.F16}.get(dtype, T.F32)


def plan_text_tensors(checkpoint: Checkpoint, float_type: T) -> list[PlannedTensor]:
    """Every tensor of the text file, matrices in `float_type`, vectors in F32."""
    text = checkpoint.hparams.text
    plans: list[PlannedTensor] = []

    def planned(name: W.WeightName, shape: tuple[int, ...], rows: Rows) -> PlannedTensor:
        qtype = T.F32 if name.kind == Kind.VECTOR else storage_type(float_type, shape[-1])
        return PlannedTensor(name.gguf, shape, qtype, rows)

    for name in W.names(W.TextModel):
        if name.field == "rope_freqs":
            factors = text.rope.llama3_factors(text.head_dim)
            if factors is not None:
                plans.append(planned(name, factors.shape, array_rows(factors)))
            continue
        entry = checkpoint.entry(source_name(name))
        shape = (text.vocab_size, entry.shape[1]) if name.field == "token_embd" else entry.shape
        plans.append(planned(name, shape, checkpoint_rows(checkpoint, source_name(name), shape[-1])))

    heads = {"attn_q": text.num_attention_heads, "attn_k": text.num_key_value_heads}
    for gguf_index, stack_index in enumerate(text.self_attention_layers):
        for name in W.names(W.SelfAttentionLayer, *W.self_attention_prefixes(gguf_index, stack_index)):
            entry = checkpoint.entry(source_name(name))
            if name.field in heads:
                n_head = heads[name.field]
                rows = whole_tensor_rows(checkpoint, source_name(name), partial(rope_permute, n_head=n_head))
            else:
                rows = checkpoint_rows(checkpoint, source_name(name), entry.shape[-1])
            plans.append(planned(name, entry.shape, rows))
    return plans


def text_metadata(checkpoint: Checkpoint, writer: gguf.GGUFWriter, float_type: T, name: str,
                  source_url: str | None, pair_id: str) -> None:
    """llama.cpp's `llama` keys, the Llama 3 tokenizer and chat template, and who made the weights."""
    text = checkpoint.hparams.text
    vocab = read_vocabulary(checkpoint.tokenizer, checkpoint.tokenizer_config, text.vocab_size)
    llama_metadata(writer, text, vocab, checkpoint.chat_template, FLOAT_FTYPES[float_type], name=name,
                   source_url=source_url, license=checkpoint.license, pair_id=pair_id)


def llama_metadata(writer: gguf.GGUFWriter, text: TextHParams, vocab: Vocabulary, chat_template: str | None,
                   file_type: int, name: str, source_url: str | None, license: str | None, pair_id: str) -> None:
    """The keys of a text file, whatever it was made from (a checkpoint, or an Ollama GGUF by `lva import`)."""
    writer.add_name(name)
    if source_url:
        writer.add_source_repo_url(source_url)
    if license:
        writer.add_license(license)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(len(text.self_attention_layers))
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_rope_freq_base(text.rope.theta)
    writer.add_rope_dimension_count(text.head_dim)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_vocab_size(text.vocab_size)
    writer.add_file_type(file_type)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for token_id, add in ((vocab.bos_id, writer.add_bos_token_id), (vocab.eos_id, writer.add_eos_token_id),
                          (vocab.eot_id, writer.add_eot_token_id), (vocab.eom_id, writer.add_eom_token_id),
                          (vocab.pad_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    add_metadata(writer, {K.PAIR_ID: pair_id})


def write_text_gguf(checkpoint: Checkpoint, path: Path, float_type: T, name: str, source_url: str | None,
                    pair_id: str, progress: tqdm) -> None:
    """Write the text file at `path` with its matrices in `float_type` (F32, F16 or BF16)."""
    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    text_metadata(checkpoint, writer, float_type, name, source_url, pair_id)
    write_gguf(path, writer, plan_text_tensors(checkpoint, float_type), progress)
