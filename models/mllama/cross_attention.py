"""The gated cross-attention layer of the mllama decoder as ggml graphs (HF MllamaCrossAttentionDecoderLayer).

    x += tanh(attn_gate) * o(attn(q_norm(q(norm(x))), k_norm(k(image)), v(image)))
    x += tanh(mlp_gate)  * mlp(ffn_norm(x))

No RoPE; grouped-query attention over the image tokens of the real tiles only (the padded tiles are
masked in the reference, so leaving them out is exact). K/V of the image are computed once per image
(`image_key_value`); the text side runs per batch of rows (`cross_attention_layer`). Rows that see no
image never reach this code: Meta's row mask makes them pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models import ggml
from models.ggml import Graph, Tensor
from models.kernels import ops
from models.kernels.paths import KernelPath
from models.mllama.hparams import TextHParams
from models.mllama.weights import CrossAttentionLayer, gguf_name


@dataclass(frozen=True)
class Gates:
    """tanh of the layer's two gates: they scale whole branches, so they are plain numbers here."""

    attn: float
    mlp: float

    @classmethod
    def load(cls, tensors, prefix: str) -> Gates:
        def tanh(field: str) -> float:
            return float(np.tanh(np.float32(tensors.scalar(gguf_name(CrossAttentionLayer, field, prefix)))))
        return cls(attn=tanh("attn_gate"), mlp=tanh("mlp_gate"))


def image_key_value(g: Graph, image: Tensor, w: CrossAttentionLayer, hp: TextHParams) -> tuple[Tensor, Tensor]:
    """K = k_norm(k(image)) as [head_dim, tokens, kv_heads]; V transposed as [tokens, head_dim, kv_heads]."""
    hd, kv_heads, tokens = hp.head_dim, hp.num_key_value_heads, ggml.shape(image)[1]
    k = g.rms_norm(g.reshape(g.mul_mat(w.attn_k, image), hd, kv_heads, tokens), w.attn_k_norm, hp.rms_norm_eps)
    v = g.reshape(g.mul_mat(w.attn_v, image), hd, kv_heads, tokens)
    return g.permute(k, 0, 2, 1), g.permute(v, 1, 2, 0)


def cross_attention_layer(g: Graph, x: Tensor, w: CrossAttentionLayer, gates: Gates,
                          images: list[tuple[int, Tensor, Tensor]], hp: TextHParams, path: KernelPath) -> Tensor:
    """x [hidden, rows] -> x after the layer. The rows come in runs, each attending to its own image:
    `images` holds (rows, key, value_t) per run, in order, the K/V as `image_key_value` lays them out (rows
    of several sequences decoded together see different images; the layer's weights are read once).

    `path` is how the attention over an image runs: our CPU kernel (`path.ours`, for graphs on the CPU)
    takes a decoded token's few rows over F16 K/V; anything else runs ggml's ops."""
    hd, rows = hp.head_dim, ggml.shape(x)[1]
    kv_heads, group = hp.num_key_value_heads, hp.num_attention_heads // hp.num_key_value_heads
    h = g.rms_norm(x, w.attn_norm, hp.rms_norm_eps)
    q = g.rms_norm(g.reshape(g.mul_mat(w.attn_q, h), hd, group, kv_heads, rows), w.attn_q_norm, hp.rms_norm_eps)
    # The query heads of one KV head become columns of one product, so each image K/V is read once per step.
    q = g.reshape(g.cont(g.permute(q, 0, 1, 3, 2)), hd, group * rows, kv_heads)      # [hd, group*rows, kv]
    runs, first = [], 0
    for count, key, value_t in images:
        q_run = q if count == rows else g.cont(g.view(q, (hd, group * count, kv_heads), group * first * 4 * hd))
        runs.append(image_attention(g, q_run, key, value_t, hd ** -0.5, path))      # [hd, group*count, kv]
        first += count
    attn = runs[0]
    for run in runs[1:]:
        attn = g.concat(attn, run, 1)                                                 # [hd, group*rows, kv]
    attn = g.reshape(attn, hd, group, rows, kv_heads)
    attn = g.cont(g.permute(attn, 0, 1, 3, 2))                                        # [hd, group, kv, rows]
    attn = g.mul_mat(w.attn_output, g.reshape(attn, hp.hidden_size, rows))
    x = g.add(x, g.scale(attn, gates.attn))
    h = g.rms_norm(x, w.ffn_norm, hp.rms_norm_eps)
    mlp = g.mul_mat(w.ffn_down, g.mul(g.silu(g.mul_mat(w.ffn_gate, h)), g.mul_mat(w.ffn_up, h)))
    return g.add(x, g.scale(mlp, gates.mlp))


def image_attention(g: Graph, q: Tensor, key: Tensor, value_t: Tensor, scale: float, path: KernelPath) -> Tensor:
    """softmax(scale q keyᵀ) value per KV head: [hd, n_q, kv] for q [hd, n_q, kv] (the query heads of a KV
    head side by side). Our CPU kernel where `path` is ours and it fits (a decoded token's few rows over
    F16 K/V), else ggml's ops."""
    hd, n_q = ggml.shape(q)[:2]
    if path.ours and ops.cross_attention_fits(hd, n_q, ggml.struct(key).type):
        return ops.cross_attention(g, q, key, value_t, scale, path)
    # Q·Kᵀ with the image tokens as the wide side: ggml's CPU kernels run this orientation about 3x
    # faster than a few query columns against a tall K (bench/cross_attention_bench.py).
    scores = g.mul_mat(g.cast(q, ggml.struct(key).type), key)                     # [n_q, tokens, kv]
    scores = g.soft_max(g.cont(g.permute(scores, 1, 0, 2)), None, scale)          # [tokens, n_q, kv]
    return g.mul_mat(value_t, scores)
