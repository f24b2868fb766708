"""One vision encoder layer at the real 11B width on 4 tiles: where the encode time goes.

The 4-tile encode runs 40 such layers (32 local + 8 global) over 6432 tokens, so a layer's time x 40 is
the encode time. This isolates the two costs per weight type: the matrix products (the layer without its
attention) and the attention (the rest), for the attention paths the runtime has: ggml's flash attention
with F16 K/V (used for F16/BF16/quantized towers) and the exact F32 softmax path (used for F32 towers).
Then the kernels' rates: a layer-sized matrix product per weight type, and ggml's flash attention with
and without Meta's padding mask (the encoder orders its tokens so that it needs none), attention unfused
into BF16 products, and the encode time they imply at best.

    python bench/vision_layer_bench.py                 # F16, BF16, Q8_0 weights
    python bench/vision_layer_bench.py --types BF16 --runs 3 --hf-seconds 76.5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import ggml  # noqa: E402
from models.ggml import F16, F32, Graph  # noqa: E402
from models.mllama import vision  # noqa: E402
from models.mllama.hparams import VisionHParams  # noqa: E402
from models.mllama.weights import VisionLayer  # noqa: E402

HP = VisionHParams(hidden_size=1280, intermediate_size=5120, num_hidden_layers=1, num_global_layers=0,
                   attention_heads=16, intermediate_layers_indices=(), image_size=560, patch_size=14, num_channels=3,
                   max_num_tiles=4, vision_output_dim=1280, norm_eps=1e-5, supported_aspect_ratios=((2, 2),))
TOKENS = vision.padded_patches(HP) * HP.max_num_tiles
REAL_TOKENS = HP.num_patches * HP.max_num_tiles
LAYERS_PER_ENCODE = 40


def random_layer(backend: ggml.Backend, qtype: Q, rng: np.random.Generator) -> tuple[VisionLayer, Graph, int]:
    d, ffn = HP.hidden_size, HP.intermediate_size
    shapes = {"attn_norm": (d,), "attn_norm_bias": (d,), "attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d),
              "attn_output": (d, d), "ffn_norm": (d,), "ffn_norm_bias": (d,), "ffn_up": (d, ffn),
              "ffn_up_bias": (ffn,), "ffn_down": (ffn, d), "ffn_down_bias": (d,)}
    g = Graph(len(shapes) + 1)
    tensors = {name: g.new(qtype if len(shape) == 2 else F32, *shape, name=name) for name, shape in shapes.items()}
    buffer = backend.alloc(g)
    for name, shape in shapes.items():
        values = (rng.standard_normal(shape[::-1]) / np.sqrt(shape[0])).astype(np.float32)
        if len(shape) == 1 or qtype == F32:
            ggml.tensor_set(tensors[name], values)
        elif qtype == F16:
            ggml.tensor_set(tensors[name], values.astype(np.float16))
        elif qtype == Q.BF16:
            ggml.tensor_set(tensors[name], (values.view(np.uint32) >> 16).astype(np.uint16))
        else:
            ggml.tensor_set(tensors[name], ggml.quantize_rows(values, qtype))
    return VisionLayer(**tensors), g, buffer


def time_graph(backend: ggml.Backend, build, runs: int) -> float:
    """Best seconds of a graph that `build(g)` makes, returning its inputs."""
    scratch, best = ggml.Scratch(backend), float("inf")
    for _ in range(runs):
        g = Graph()
        feeds = build(g)
        start = time.perf_counter()
        scratch.run(g, feeds)
        best = min(best, time.perf_counter() - start)
        g.close()
    scratch.close()
    return best


def time_layer(backend: ggml.Backend, layer: VisionLayer, flash: bool | None, runs: int) -> float:
    """Best seconds of one layer; flash=None runs the layer's matrix products without attention."""
    x = np.random.default_rng(1).standard_normal((TOKENS, HP.hidden_size)).astype(np.float32)

    def build(g: Graph) -> dict:
        x_in = g.input(F32, HP.hidden_size, TOKENS, name="x")
        if flash is None:
            for weight in (layer.attn_q, layer.attn_k):
                g.expand(g.mul_mat(weight, x_in))
            h = g.mul_mat(layer.attn_output, g.mul_mat(layer.attn_v, x_in))
            up = g.gelu(g.linear(h, layer.ffn_up, layer.ffn_up_bias))
            g.expand(g.linear(up, layer.ffn_down, layer.ffn_down_bias))
        else:
            g.expand(vision.encoder_layer(g, x_in, layer, HP, REAL_TOKENS, "flash" if flash else "softmax"))
        return {x_in: x}
    return time_graph(backend, build, runs)


def product_rate(backend: ggml.Backend, qtype: Q, runs: int, rng: np.random.Generator) -> float:
    """GFLOP/s of the layer's widest product (ffn_up: 1280 -> 5120) over the 6432 tokens."""
    d, ffn = HP.hidden_size, HP.intermediate_size
    layer, weights, buffer = random_layer(backend, qtype, rng)
    x = rng.standard_normal((TOKENS, d)).astype(np.float32)

    def build(g: Graph) -> dict:
        x_in = g.input(F32, d, TOKENS, name="x")
        g.expand(g.mul_mat(layer.ffn_up, x_in))
        return {x_in: x}
    seconds = time_graph(backend, build, runs)
    ggml.free_buffer(buffer)
    weights.close()
    return 2 * d * ffn * TOKENS / seconds / 1e9


def attention_seconds(backend: ggml.Backend, masked: bool, runs: int, rng: np.random.Generator) -> float:
    """ggml's flash attention over the 6432 tokens, F16 K/V: with Meta's mask as the tile-major order needs
    it, or split as the encoder order runs it (real queries over all keys, padding over the real keys)."""
    heads, hd = HP.attention_heads, HP.hidden_size // HP.attention_heads
    q = rng.standard_normal((heads, TOKENS, hd)).astype(np.float32)
    kv = rng.standard_normal((heads, TOKENS, hd)).astype(np.float16)
    is_pad = ~np.isin(np.arange(TOKENS), vision.encoder_order(HP, HP.max_num_tiles)[:REAL_TOKENS])
    mask = np.where(is_pad[:, None] & is_pad[None, :], -np.inf, 0).astype(np.float16)

    def build(g: Graph) -> dict:
        q_in, kv_in = g.input(F32, hd, TOKENS, heads, name="q"), g.input(F16, hd, TOKENS, heads, name="kv")
        if masked:
            mask_in = g.input(F16, TOKENS, TOKENS, name="mask")
            g.expand(g.flash_attn(q_in, kv_in, kv_in, mask_in, hd ** -0.5))
            return {q_in: q, kv_in: kv, mask_in: mask}
        real_keys = g.view(kv_in, (hd, REAL_TOKENS, heads))
        pad_queries = g.view(q_in, (hd, TOKENS - REAL_TOKENS, heads), REAL_TOKENS * ggml.struct(q_in).nb[1])
        g.expand(g.flash_attn(g.view(q_in, (hd, REAL_TOKENS, heads)), kv_in, kv_in, None, hd ** -0.5))
        g.expand(g.flash_attn(pad_queries, real_keys, real_keys, None, hd ** -0.5))
        return {q_in: q, kv_in: kv}
    return time_graph(backend, build, runs)


def unfused_attention_seconds(backend: ggml.Backend, products_only: bool, runs: int,
                              rng: np.random.Generator) -> float:
    """The real queries' attention without ggml's fused kernel: BF16 products, the head dim padded to 96 (ggml's
    BF16 matrix kernel wants rows in multiples of 32; 80 runs several times slower), chunks of 128 queries so
    the F32 scores stay in cache. products_only: just the Q·Kᵀ products, with no softmax and no P·V."""
    heads, hd, chunk, padded = HP.attention_heads, HP.hidden_size // HP.attention_heads, 128, 96
    q, k, v = (rng.standard_normal((heads, TOKENS, hd)).astype(np.float32) for _ in range(3))

    def build(g: Graph) -> dict:
        q_in, k_in, v_in = (g.input(F32, hd, TOKENS, heads, name=name) for name in "qkv")
        queries, keys = g.pad(q_in, padded - hd), g.cast(g.pad(k_in, padded - hd), Q.BF16)
        values_t = g.cast(g.cont(g.permute(v_in, 1, 0, 2)), Q.BF16)
        for first in range(0, REAL_TOKENS, chunk):
            rows = g.view(queries, (padded, min(chunk, REAL_TOKENS - first), heads), first * ggml.struct(queries).nb[1])
            scores = g.mul_mat(keys, rows)
            g.expand(scores if products_only else g.mul_mat(values_t, g.soft_max(scores, None, hd ** -0.5)))
        return {q_in: q, k_in: k, v_in: v}
    return time_graph(backend, build, runs)


def print_kernel_rates(backend: ggml.Backend, runs: int, rng: np.random.Generator, hf_seconds: float | None) -> None:
    heads, hd, d, ffn = HP.attention_heads, HP.hidden_size // HP.attention_heads, HP.hidden_size, HP.intermediate_size
    attention_flop = 4 * TOKENS * TOKENS * hd * heads
    products_flop = 2 * TOKENS * (4 * d * d + 2 * d * ffn)
    rates = {name: product_rate(backend, Q[name], runs, rng) for name in ("F32", "F16", "BF16")}
    print("\n| matrix product (1280 -> 5120, 6432 tokens) | GFLOP/s |\n|---|--:|")
    for name, rate in rates.items():
        print(f"| {name} weights | {rate:.0f} |")
    times = {True: float("inf"), False: float("inf")}
    for _ in range(runs):                                   # interleaved, so both see the same machine
        for masked in times:
            times[masked] = min(times[masked], attention_seconds(backend, masked, 1, rng))
    real_flop = attention_flop * REAL_TOKENS // TOKENS       # the real queries over every key
    unfused = {only: unfused_attention_seconds(backend, only, runs, rng) for only in (True, False)}
    rows = [("flash attention, F16 K/V, with Meta's mask (tile-major order)", attention_flop, times[True]),
            ("flash attention, F16 K/V, no mask (encoder order)", attention_flop, times[False]),
            ("unfused BF16, head dim padded to 96: the real queries' Q·Kᵀ products alone", real_flop // 2,
             unfused[True]),
            ("unfused BF16, head dim padded to 96: the real queries' whole attention", real_flop, unfused[False])]
    print("\n| attention, one layer | GFLOP | s | GFLOP/s |\n|---|--:|--:|--:|")
    for label, flop, seconds in rows:
        print(f"| {label} | {flop / 1e9:.0f} | {seconds:.2f} | {flop / seconds / 1e9:.0f} |")
    best = LAYERS_PER_ENCODE * (attention_flop / (rates["F32"] * 1e9) + products_flop / (rates["BF16"] * 1e9))
    print(f"\nA 4-tile encode with attention at the F32 product rate and BF16 products: at least {best:.0f} s "
          f"({LAYERS_PER_ENCODE} layers x ({attention_flop / 1e9:.0f} GFLOP / {rates['F32']:.0f} + "
          f"{products_flop / 1e9:.0f} GFLOP / {rates['BF16']:.0f} GFLOP/s)), before norms and activations.")
    if hf_seconds:
        total, target = LAYERS_PER_ENCODE * (attention_flop + products_flop), 0.6 * hf_seconds
        print(f"The target, 0.6 x HF's {hf_seconds:.1f} s = {target:.1f} s for {total / 1e12:.1f} TFLOP of products "
              f"and attention, means {total / target / 1e9:.0f} GFLOP/s on average, softmax and norms included.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=["F16", "BF16", "Q8_0"])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--exact", action="store_true", help="also time the F32 softmax attention path")
    parser.add_argument("--hf-seconds", type=float, help="HF's bf16 4-tile encode (from runtime_bench.py): "
                        "print the average rate the 0.6 x HF target asks for")
    args = parser.parse_args()
    backend = ggml.Backend(args.threads)
    rng = np.random.default_rng(0)
    print(f"one vision layer, {TOKENS} tokens (4 tiles), {args.threads} threads, best of {args.runs}; "
          f"x {LAYERS_PER_ENCODE} = a 4-tile encode")
    print("| weights | attention | layer s | matrix products s | attention s | encode estimate s |")
    print("|---|---|--:|--:|--:|--:|")
    for name in args.types:
        layer, weights, buffer = random_layer(backend, Q[name], rng)
        products = time_layer(backend, layer, None, args.runs)
        for flash in ([True, False] if args.exact else [True]):
            total = time_layer(backend, layer, flash, args.runs)
            label = "flash (F16 K/V)" if flash else "softmax (F32)"
            print(f"| {name} | {label} | {total:.2f} | {products:.2f} | {total - products:.2f} | "
                  f"{total * LAYERS_PER_ENCODE:.0f} |", flush=True)
        ggml.free_buffer(buffer)
        weights.close()
    print_kernel_rates(backend, args.runs, rng, args.hf_seconds)


if __name__ == "__main__":
    main()
