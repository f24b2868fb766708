"""One vision encoder layer at the real 11B width on 4 tiles: where the encode time goes.

The 4-tile encode runs 40 such layers (32 local + 8 global) over 6432 tokens, so a layer's time x 40 is
most of the encode time. In one run, on one machine:

- the layer per weight type and attention (our fused kernel's fastest path here, ggml's flash attention),
  split into the layer without attention and the rest; and F16 as the runtime multiplies it where that is
  our int16 product (beside our AVX2 path);
- the parts of the layer the runtime uses by default (its fastest weight type here, our kernel): matrix
  products, attention, layer norms, GELU, residual adds, each timed alone; and the layer with each GELU;
- the matrix product rate: ggml's per weight type, and torch's in fp32, bf16 and 8-bit integers (a child
  process with the `reference` extra's interpreter);
- attention alone: each path of our kernel this CPU runs, ggml's flash attention (with Meta's mask in
  HF's tile-major order, and without, in the encoder's order), and torch's SDPA in bf16 and fp32 as HF
  calls it (a child process with the `reference` extra's interpreter).

    python bench/vision_layer_bench.py                         # prints the tables
    python bench/vision_layer_bench.py --write-docs            # and rewrites its section of PERFORMANCE.md
    LVA_ATTENTION=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 /work/venv-avx2/bin/python bench/vision_layer_bench.py \
        --types F16 Q8_0 F32 --section vision-layer-avx2 --write-docs    # as an AVX2-only CPU (first_answer_bench)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from models import ggml  # noqa: E402
from models.ggml import F16, F32, Graph  # noqa: E402
from models.kernels import cpu as kernels  # noqa: E402
from models.mllama import vision  # noqa: E402
from models.mllama.hparams import VisionHParams  # noqa: E402
from models.mllama.weights import VisionLayer  # noqa: E402

from report import emulation_note, machine, write_section  # noqa: E402

HP = VisionHParams(hidden_size=1280, intermediate_size=5120, num_hidden_layers=1, num_global_layers=0,
                   attention_heads=16, intermediate_layers_indices=(), image_size=560, patch_size=14, num_channels=3,
                   max_num_tiles=4, vision_output_dim=1280, norm_eps=1e-5, supported_aspect_ratios=((2, 2),))
TOKENS = vision.padded_patches(HP) * HP.max_num_tiles
REAL_TOKENS = HP.num_patches * HP.max_num_tiles
HEADS, HEAD_DIM = HP.attention_heads, HP.hidden_size // HP.attention_heads
LAYERS_PER_ENCODE = 40
ATTENTION_FLOP = 4 * HP.hidden_size * (REAL_TOKENS * TOKENS + (TOKENS - REAL_TOKENS) * REAL_TOKENS)
PRODUCTS_FLOP = 2 * TOKENS * (4 * HP.hidden_size ** 2 + 2 * HP.hidden_size * HP.intermediate_size)
DEFAULT_REFERENCE_PYTHON = "/work/refvenv/bin/python"
HEADING = "### One encoder layer: the kernels' rates"


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


def hidden_states(rng: np.random.Generator, width: int = HP.hidden_size) -> np.ndarray:
    return rng.standard_normal((TOKENS, width)).astype(np.float32)


# The GELUs an encoder layer can run, as (graph, x, bias, attention) -> gelu(x + bias).
GELUS = {"ours (the bias added inside)": vision.biased_gelu,
         "ggml's tanh table, after an add": lambda g, x, bias, attention: g.gelu_tanh(g.add(x, bias)),
         "ggml's erf, after an add": lambda g, x, bias, attention: g.gelu(g.add(x, bias))}


def time_layer(backend: ggml.Backend, layer: VisionLayer, attention: str, runs: int, without_attention: bool = False,
               gelu=vision.biased_gelu) -> float:
    """Best seconds of one layer as the runtime builds it, or with its attention left out (and another GELU)."""
    x = hidden_states(np.random.default_rng(1))
    product = lambda g, w, x: vision.product(g, w, x, attention)  # noqa: E731  (int16 beside our kernel)

    def build(g: Graph) -> dict:
        x_in = g.input(F32, HP.hidden_size, TOKENS, name="x")
        if without_attention:
            h = g.layer_norm(x_in, layer.attn_norm, layer.attn_norm_bias, HP.norm_eps)
            q, k, v = (product(g, w, h) for w in (layer.attn_q, layer.attn_k, layer.attn_v))
            h = g.add(x_in, product(g, layer.attn_output, g.add(g.add(q, k), v)))
            up = product(g, layer.ffn_up, g.layer_norm(h, layer.ffn_norm, layer.ffn_norm_bias, HP.norm_eps))
            mlp = g.add(product(g, layer.ffn_down, gelu(g, up, layer.ffn_up_bias, attention)), layer.ffn_down_bias)
            g.expand(g.add(h, mlp))
        else:
            g.expand(vision.encoder_layer(g, x_in, layer, HP, REAL_TOKENS, attention))
        return {x_in: x}
    return time_graph(backend, build, runs)


def product_rate(backend: ggml.Backend, qtype: Q, runs: int, rng: np.random.Generator, int16: bool = False) -> float:
    """GFLOP/s of the layer's widest product (ffn_up: 1280 -> 5120) over the 6432 tokens: ggml's, or (F16
    weights) our int16 product's."""
    d, ffn = HP.hidden_size, HP.intermediate_size
    layer, weights, buffer = random_layer(backend, qtype, rng)
    copies = vision.swap_for_copies([layer], "int16", backend, None) if int16 else None
    x = hidden_states(rng)

    def build(g: Graph) -> dict:
        x_in = g.input(F32, d, TOKENS, name="x")
        g.expand(vision.product(g, layer.ffn_up, x_in, "avx2"))
        return {x_in: x}
    seconds = time_graph(backend, build, runs)
    for context, memory in [copies, (weights, buffer)] if copies else [(weights, buffer)]:
        ggml.free_buffer(memory)
        context.close()
    return 2 * d * ffn * TOKENS / seconds / 1e9


def attention_seconds(backend: ggml.Backend, attention: str, runs: int, rng: np.random.Generator,
                      masked: bool = False) -> float:
    """One layer's attention alone: `vision.attend` in encoder order, or ggml's flash attention over the
    tile-major order with Meta's mask (masked=True), as HF's order would need it."""
    q, k, v = (hidden_states(rng) for _ in range(3))

    def build(g: Graph) -> dict:
        inputs = [g.input(F32, HP.hidden_size, TOKENS, name=name) for name in "qkv"]
        feeds = dict(zip(inputs, (q, k, v)))
        if not masked:
            g.expand(vision.attend(g, *inputs, HEADS, REAL_TOKENS, attention))
            return feeds
        is_pad = ~np.isin(np.arange(TOKENS), vision.encoder_order(HP, HP.max_num_tiles)[:REAL_TOKENS])
        mask = np.where(is_pad[:, None] & is_pad[None, :], -np.inf, 0).astype(np.float16)
        mask_in = g.input(F16, TOKENS, TOKENS, name="mask")
        heads = [g.permute(g.reshape(t, HEAD_DIM, HEADS, TOKENS), 0, 2, 1) for t in inputs]
        k16, v16 = g.cast(heads[1], F16), g.cast(heads[2], F16)
        g.expand(g.flash_attn(heads[0], k16, v16, mask_in, HEAD_DIM ** -0.5))
        return {**feeds, mask_in: mask}
    return time_graph(backend, build, runs)


def layer_parts(backend: ggml.Backend, layer: VisionLayer, attention: str, runs: int,
                rng: np.random.Generator) -> dict[str, float]:
    """Each part of a layer timed alone, on the layer's shapes."""
    d, ffn = HP.hidden_size, HP.intermediate_size
    x, wide = hidden_states(rng), hidden_states(rng, ffn)
    product = lambda g, w, x: vision.product(g, w, x, attention)  # noqa: E731

    def timed(make) -> float:
        def build(g: Graph) -> dict:
            x_in, wide_in = g.input(F32, d, TOKENS, name="x"), g.input(F32, ffn, TOKENS, name="wide")
            g.expand(make(g, x_in, wide_in))
            return {x_in: x, wide_in: wide}
        return time_graph(backend, build, runs)

    def all_of(g: Graph, tensors: list) -> int:
        for t in tensors[:-1]:
            g.expand(t)
        return tensors[-1]

    return {
        "Q, K, V, O products": timed(lambda g, x, w: all_of(g, [product(g, m, x) for m in
                                                               (layer.attn_q, layer.attn_k, layer.attn_v,
                                                                layer.attn_output)])),
        "MLP products (down bias)": timed(lambda g, x, w: all_of(g, [product(g, layer.ffn_up, x),
                                                                     g.add(product(g, layer.ffn_down, w),
                                                                           layer.ffn_down_bias)])),
        "attention": attention_seconds(backend, attention, runs, rng),
        "2 layer norms": timed(lambda g, x, w: all_of(g, [g.layer_norm(x, layer.attn_norm, layer.attn_norm_bias,
                                                                      HP.norm_eps),
                                                         g.layer_norm(x, layer.ffn_norm, layer.ffn_norm_bias,
                                                                      HP.norm_eps)])),
        "GELU (with the up bias)": timed(lambda g, x, w: vision.biased_gelu(g, w, layer.ffn_up_bias, attention)),
        "2 residual adds": timed(lambda g, x, w: all_of(g, [g.add(x, x), g.add(x, x)])),
    }


def torch_peer(script: str, python: str, threads: int, runs: int) -> dict | str:
    """One of torch's peers (bench/torch_attention.py, bench/torch_products.py): seconds per variant, or why
    there are none."""
    if not Path(python).exists():
        return f"no torch: {python} does not exist (--reference-python)"
    done = subprocess.run([python, str(REPO / "bench" / script), "--threads", str(threads), "--runs", str(runs)],
                          capture_output=True, text=True)
    if done.returncode:
        return f"torch's {script} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace) -> str:
    backend = ggml.Backend(args.threads)
    rng = np.random.default_rng(0)
    ours = kernels.chosen_path()               # LVA_ATTENTION=avx2 on an AVX-512 CPU: as an AVX2-only CPU would
    paths = [p for p in kernels.FASTEST_FIRST if p in kernels.runnable_paths()]
    if os.environ.get(kernels.ENVIRONMENT):
        paths = [p for p in paths if p == ours]
    products = vision.products_for(int(F16), ours or "flash", on_cpu=True)
    default_type = {"bf16": "BF16", "int16": "F16 as int16"}.get(products, "F16")
    scratch = ggml.Scratch(backend)
    lines = [*emulation_note(),
             f"Measured {datetime.date.today().isoformat()} by `python bench/vision_layer_bench.py` on {machine()}, "
             f"{args.threads} threads, best of {args.runs}. One layer: {TOKENS} tokens (4 tiles, the real ones "
             f"first), {PRODUCTS_FLOP / 1e9:.0f} GFLOP of matrix products and {ATTENTION_FLOP / 1e9:.0f} GFLOP of "
             f"attention; a 4-tile encode is {LAYERS_PER_ENCODE} layers.", "",
             "| weights | attention | layer s | without attention s | attention s | × 40 s |",
             "|---|---|--:|--:|--:|--:|"]
    for name in args.types:
        layer, weights, buffer = random_layer(backend, Q[name], rng)
        variants, copies = [(name, layer, (ours, "flash"))], None
        if name == "F16" and products == "int16":         # the runtime's products here, beside our kernel
            packed = dataclasses.replace(layer)
            copies = vision.swap_for_copies([packed], "int16", backend, scratch)
            variants.append(("F16 as int16", packed, (ours,)))
        for label, variant, attentions in variants:
            for attention in [p for p in attentions if p]:
                total = time_layer(backend, variant, attention, args.runs)
                without = time_layer(backend, variant, attention, args.runs, without_attention=True)
                lines.append(f"| {label} | {attention} | {total:.2f} | {without:.2f} | {total - without:.2f} | "
                             f"{total * LAYERS_PER_ENCODE:.0f} |")
                print(lines[-1], flush=True)
            if label == default_type and ours:
                parts = layer_parts(backend, variant, ours, args.runs, rng)
                whole = time_layer(backend, variant, ours, args.runs)
                by_gelu = {label: time_layer(backend, variant, ours, args.runs, without_attention=True, gelu=gelu)
                           for label, gelu in GELUS.items()}
        for context, memory in [copies, (weights, buffer)] if copies else [(weights, buffer)]:
            ggml.free_buffer(memory)
            context.close()
    if default_type.split()[0] in args.types and ours:
        lines += ["", f"The parts of one layer as the runtime runs it here ({default_type} products, attention "
                      f"`{ours}`), each timed alone; the layer itself took {whole:.2f} s:", "",
                  "| part | s | share of the sum |", "|---|--:|--:|"]
        total = sum(parts.values())
        lines += [f"| {part} | {s:.3f} | {100 * s / total:.0f} % |" for part, s in parts.items()]
        lines.append(f"| sum of the parts | {total:.3f} | |")
        lines += ["", "The layer without its attention, by the GELU it runs (the runtime's is the first):", "",
                  "| GELU in the layer | layer without attention s |", "|---|--:|"]
        lines += [f"| {label} | {s:.3f} |" for label, s in by_gelu.items()]
    lines += ["", "| matrix product (1280 -> 5120, 6432 tokens) | GFLOP/s (integers: GOP/s) |", "|---|--:|"]
    for name in ("F32", "F16", "BF16", "Q8_0"):
        lines.append(f"| ggml, {name} weights | {product_rate(backend, Q[name], args.runs, rng):.0f} |")
    if "avx2" in kernels.runnable_paths():
        rate = product_rate(backend, F16, args.runs, rng, int16=True)
        lines.append(f"| lva int16 product, F16 weights | {rate:.0f} |")
    torch_products = torch_peer("torch_products.py", args.reference_python, args.threads, args.runs)
    if isinstance(torch_products, dict):
        lines += [f"| torch {torch_products['torch']}, {variant} | {torch_products['flop'] / seconds / 1e9:.0f} |"
                  for variant, seconds in torch_products["seconds"].items()]
    else:
        lines.append(f"\n({torch_products})")
    rows = [(f"lva kernel, {path} path", attention_seconds(backend, path, args.runs, rng)) for path in paths]
    rows += [("ggml flash attention (F16 K/V), encoder order, no mask", attention_seconds(backend, "flash", args.runs,
                                                                                          rng)),
             ("ggml flash attention (F16 K/V), tile-major with Meta's mask",
              attention_seconds(backend, "flash", args.runs, rng, masked=True))]
    torch_rows = torch_peer("torch_attention.py", args.reference_python, args.threads, args.runs)
    if isinstance(torch_rows, dict):
        rows += [(f"torch {torch_rows['torch']} SDPA, {variant}", seconds)
                 for variant, seconds in torch_rows["seconds"].items()]
    lines += ["", f"Attention of one layer ({ATTENTION_FLOP / 1e9:.0f} GFLOP: the pairs Meta's mask keeps; torch "
                  f"and the masked flash attention also compute the few masked pairs):", "",
              "| attention | s | GFLOP/s |", "|---|--:|--:|"]
    lines += [f"| {label} | {seconds:.2f} | {ATTENTION_FLOP / seconds / 1e9:.0f} |" for label, seconds in rows]
    if isinstance(torch_rows, str):
        lines.append(f"\n({torch_rows})")
    scratch.close()
    backend.close()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=["F16", "BF16", "Q8_0"])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON,
                        help="an interpreter with torch, for its SDPA and products (the `reference` extra)")
    parser.add_argument("--write-docs", action="store_true", help="rewrite this bench's section of PERFORMANCE.md")
    parser.add_argument("--section", default="vision-layer", help="the section of PERFORMANCE.md --write-docs writes")
    args = parser.parse_args()
    text = report(args)
    print(text)
    if args.write_docs:
        write_section(args.section, text, HEADING if args.section == "vision-layer" else f"#### {args.section}")


if __name__ == "__main__":
    main()
