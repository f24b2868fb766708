"""One vision encoder layer at the real 11B width on 4 tiles: each arithmetic's rate beside torch's, and
where the encode time goes.

The 4-tile encode runs 40 such layers (32 local + 8 global) over 6432 tokens, so a layer's time x 40 is
most of the encode time. In one run, on one machine:

- the matrix product rate (the widest product, 1280 -> 5120 over the 6432 tokens): every path of lva's
  products this CPU runs (F32, int16, int8, per instruction set), ggml's per weight type, and torch's in
  fp32, bf16 and 8-bit integers (a child process with the `reference` extra's interpreter);
- attention alone: every path of lva's attention this CPU runs, ggml's flash attention (with Meta's mask
  in HF's tile-major order, and without, in the encoder's order), and torch's SDPA in bf16 and fp32 as HF
  calls it;
- the targets of the speed issue on this CPU: F32 products at >= 0.9 x torch fp32's Linear, F32 attention
  at >= torch fp32 SDPA's (HF's mask), int8 products at >= 1.5 x the F32 path's;
- the layer as the runtime runs it here (the paths the calibration chose), split into its parts.

    python bench/vision_layer_bench.py                         # prints the tables
    python bench/vision_layer_bench.py --write-docs            # and rewrites its section of PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as Q

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from assistant.runtime import kernel_choice  # noqa: E402
from models import ggml  # noqa: E402
from models.ggml import F16, F32, Graph, Tensor  # noqa: E402
from models.kernels import library  # noqa: E402
from models.kernels.paths import GGML_FLASH_ATTENTION, GGML_PATHS, Arithmetic, Isa, KernelPath, Paths  # noqa: E402
from models.mllama import vision  # noqa: E402
from models.mllama.hparams import VisionHParams  # noqa: E402
from models.mllama.weights import VisionLayer  # noqa: E402

from report import machine, write_section  # noqa: E402

HP = VisionHParams(hidden_size=1280, intermediate_size=5120, num_hidden_layers=1, num_global_layers=0,
                   attention_heads=16, intermediate_layers_indices=(), image_size=560, patch_size=14, num_channels=3,
                   max_num_tiles=4, vision_output_dim=1280, norm_eps=1e-5, supported_aspect_ratios=((2, 2),))
TOKENS = vision.padded_patches(HP) * HP.max_num_tiles
REAL_TOKENS = HP.num_patches * HP.max_num_tiles
HEADS, HEAD_DIM = HP.attention_heads, HP.hidden_size // HP.attention_heads
LAYERS_PER_ENCODE = 40
ATTENTION_FLOP = 4 * HP.hidden_size * (REAL_TOKENS * TOKENS + (TOKENS - REAL_TOKENS) * REAL_TOKENS)
PRODUCT_FLOP = 2 * TOKENS * HP.hidden_size * HP.intermediate_size
PRODUCTS_FLOP = 2 * TOKENS * (4 * HP.hidden_size ** 2 + 2 * HP.hidden_size * HP.intermediate_size)
DEFAULT_REFERENCE_PYTHON = "/work/refvenv/bin/python"
HEADING = "### One encoder layer: each arithmetic's rate"
F32_PRODUCTS_TARGET, F32_ATTENTION_TARGET, INT8_TARGET = 0.9, 1.0, 1.5
ORIGINALS: dict[Tensor, Tensor] = {}              # packed copy -> its F16 matrix (int8 reads both)


def ours(op: str) -> list[KernelPath]:
    """Every path of lva's kernels this CPU runs for `op`, the scalar reference aside."""
    arithmetics = (Arithmetic.F32, Arithmetic.INT16, Arithmetic.INT8, Arithmetic.BF16)
    return [KernelPath(a, isa) for isa in library.isas() for a in arithmetics
            if isa is not Isa.REFERENCE and library.runs(KernelPath(a, isa), op)
            and (isa is not Isa.AVX512_BF16 or a is Arithmetic.BF16)]


def random_layer(backend: ggml.Backend, qtype: Q, rng: np.random.Generator) -> tuple[VisionLayer, ggml.Memory]:
    d, ffn = HP.hidden_size, HP.intermediate_size
    shapes = {"attn_norm": (d,), "attn_norm_bias": (d,), "attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d),
              "attn_output": (d, d), "ffn_norm": (d,), "ffn_norm_bias": (d,), "ffn_up": (d, ffn),
              "ffn_up_bias": (ffn,), "ffn_down": (ffn, d), "ffn_down_bias": (d,)}
    memory = ggml.Memory(len(shapes))
    tensors = {name: memory.new(qtype if len(shape) == 2 else F32, *shape, name=name) for name, shape in shapes.items()}
    memory.allocate(backend)
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
    return VisionLayer(**tensors), memory


def time_graph(backend: ggml.Backend, build: Callable[[Graph], dict], runs: int) -> float:
    """Best seconds of a graph that `build(g)` makes (returning its inputs), after one untimed run."""
    scratch, best = ggml.Scratch(backend), float("inf")
    g = Graph()
    try:
        feeds = build(g)
        for run in range(runs + 1):
            start = time.perf_counter()
            scratch.run(g, feeds)
            if run:
                best = min(best, time.perf_counter() - start)
    finally:
        g.close()
        scratch.close()
    return best


def hidden_states(rng: np.random.Generator, width: int = HP.hidden_size) -> np.ndarray:
    return rng.standard_normal((TOKENS, width)).astype(np.float32)


def layer_graph(layer: VisionLayer, paths: Paths) -> vision.VisionGraph:
    """A stage's graph builder for one layer: a tower of that layer alone, over a 4-tile image."""
    tower = vision.VisionTower(HP, None, [layer], [], None, None, paths, originals=ORIGINALS)  # type: ignore[arg-type]
    image = vision.Image(np.zeros((4, 3, 560, 560), np.float32), 6, HP.max_num_tiles)
    return vision.VisionGraph(tower, image)


def time_layer(backend: ggml.Backend, layer: VisionLayer, paths: Paths, runs: int,
               without_attention: bool = False) -> float:
    """Best seconds of one layer as the runtime builds it, or with its attention left out."""
    x = hidden_states(np.random.default_rng(1))
    graph = layer_graph(layer, paths)
    if without_attention:
        graph.attend = lambda q, k, v: graph.g.add(graph.g.add(q, k), v)              # type: ignore[method-assign]
    scratch = ggml.Scratch(backend)
    try:
        x_in = graph.g.input(F32, HP.hidden_size, TOKENS, name="x")
        graph.g.expand(graph.encoder_layer(x_in, layer))
        best = float("inf")
        for run in range(runs + 1):
            start = time.perf_counter()
            scratch.run(graph.g, {x_in: x})
            if run:
                best = min(best, time.perf_counter() - start)
        return best
    finally:
        graph.close()
        scratch.close()


def with_copies(backend: ggml.Backend, layer: VisionLayer,
                products: KernelPath | Paths) -> tuple[VisionLayer, contextlib.ExitStack]:
    """The layer with its F16 matrices replaced as the runtime replaces them for `products` (one path for
    every product, or the paths of each: packed or BF16 copies), and the copies' memory, to close."""
    paths = products if isinstance(products, Paths) else dataclasses.replace(GGML_PATHS, products=products, mlp_down=products)
    copied, scratch = dataclasses.replace(layer), ggml.Scratch(backend)
    memory = contextlib.ExitStack()
    for copies in vision.make_copies([copied], paths, backend, scratch, ORIGINALS):
        memory.enter_context(copies)
    scratch.close()
    return copied, memory


def product_rate(backend: ggml.Backend, layer: VisionLayer, path: KernelPath, runs: int) -> float:
    """GFLOP/s (integers: GOP/s) of the layer's widest product, ffn_up, over the 6432 tokens."""
    x = hidden_states(np.random.default_rng(2))

    def build(g: Graph) -> dict:
        x_in = g.input(F32, HP.hidden_size, TOKENS, name="x")
        g.expand(vision.product(g, layer.ffn_up, x_in, path, ORIGINALS.get(layer.ffn_up)))
        return {x_in: x}
    return PRODUCT_FLOP / time_graph(backend, build, runs) / 1e9


def attention_seconds(backend: ggml.Backend, path: KernelPath, runs: int, masked: bool = False) -> float:
    """One layer's attention alone: `vision.attend` in encoder order, or ggml's flash attention over the
    tile-major order with Meta's mask (masked=True), as HF's order would need it."""
    rng = np.random.default_rng(3)
    q, k, v = (hidden_states(rng) for _ in range(3))

    def build(g: Graph) -> dict:
        inputs = [g.input(F32, HP.hidden_size, TOKENS, name=name) for name in "qkv"]
        feeds = dict(zip(inputs, (q, k, v)))
        if not masked:
            g.expand(vision.attend(g, *inputs, HEADS, REAL_TOKENS, path))
            return feeds
        is_pad = ~np.isin(np.arange(TOKENS), vision.encoder_order(HP, HP.max_num_tiles)[:REAL_TOKENS])
        mask = np.where(is_pad[:, None] & is_pad[None, :], -np.inf, 0).astype(np.float16)
        mask_in = g.input(F16, TOKENS, TOKENS, name="mask")
        heads = [g.permute(g.reshape(t, HEAD_DIM, HEADS, TOKENS), 0, 2, 1) for t in inputs]
        k16, v16 = g.cast(heads[1], F16), g.cast(heads[2], F16)
        g.expand(g.flash_attn(heads[0], k16, v16, mask_in, HEAD_DIM ** -0.5))
        return {**feeds, mask_in: mask}
    return time_graph(backend, build, runs)


def layer_parts(backend: ggml.Backend, layer: VisionLayer, paths: Paths, runs: int) -> dict[str, float]:
    """Each part of a layer timed alone, on the layer's shapes."""
    rng = np.random.default_rng(4)
    d, ffn = HP.hidden_size, HP.intermediate_size
    x, wide = hidden_states(rng), hidden_states(rng, ffn)

    def timed(make: Callable[[Graph, Tensor, Tensor], list[Tensor]]) -> float:
        def build(g: Graph) -> dict:
            x_in, wide_in = g.input(F32, d, TOKENS, name="x"), g.input(F32, ffn, TOKENS, name="wide")
            for t in make(g, x_in, wide_in):
                g.expand(t)
            return {x_in: x, wide_in: wide}
        return time_graph(backend, build, runs)

    def product(g: Graph, w: Tensor, x_in: Tensor, path: KernelPath = paths.products) -> Tensor:
        return vision.product(g, w, x_in, path, ORIGINALS.get(w))

    def norm(g: Graph, x_in: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return g.layer_norm(x_in, w, b, HP.norm_eps)

    return {
        "Q, K, V, O products": timed(lambda g, x_in, w: [product(g, m, x_in) for m in
                                                         (layer.attn_q, layer.attn_k, layer.attn_v, layer.attn_output)]),
        "MLP products (down bias)": timed(lambda g, x_in, w: [product(g, layer.ffn_up, x_in),
                                                              g.add(product(g, layer.ffn_down, w, paths.mlp_down),
                                                                    layer.ffn_down_bias)]),
        "attention": attention_seconds(backend, paths.attention, runs),
        "2 layer norms": timed(lambda g, x_in, w: [norm(g, x_in, layer.attn_norm, layer.attn_norm_bias),
                                                   norm(g, x_in, layer.ffn_norm, layer.ffn_norm_bias)]),
        "GELU (with the up bias)": timed(lambda g, x_in, w: [vision.biased_gelu(g, w, layer.ffn_up_bias, paths.gelu)]),
        "2 residual adds": timed(lambda g, x_in, w: [g.add(x_in, x_in), g.add(x_in, x_in)]),
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


def verdict(measured: float, required: float) -> str:
    return f"{measured:.0f} against {required:.0f}: {'PASS' if measured >= required else '**MISS**'}"


def products_section(backend: ggml.Backend, args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    rng = np.random.default_rng(0)
    rates: dict[str, float] = {}
    for path in ours("products"):
        layer, memory = random_layer(backend, Q.F16, rng)
        packed, copies = with_copies(backend, layer, path)
        with copies, memory:
            rates[f"lva {path}, F16 weights"] = product_rate(backend, packed, path, args.runs)
        print(f"products {path}: {rates[f'lva {path}, F16 weights']:.0f}", flush=True)
    for name in ("F32", "F16", "BF16", "Q8_0"):
        layer, memory = random_layer(backend, Q[name], rng)
        rates[f"ggml, {name} weights"] = product_rate(backend, layer, KernelPath(Arithmetic.STORED), args.runs)
        memory.close()
    peers = torch_peer("torch_products.py", args.reference_python, args.threads, args.runs)
    if isinstance(peers, dict):
        rates.update({f"torch {peers['torch']}, {variant}": peers["flop"] / seconds / 1e9
                      for variant, seconds in peers["seconds"].items()})
    lines = ["| matrix product (1280 -> 5120, 6432 tokens) | GFLOP/s (integers: GOP/s) |", "|---|--:|"]
    lines += [f"| {label} | {rate:.0f} |" for label, rate in rates.items()]
    if isinstance(peers, str):
        lines.append(f"\n({peers})")
    return lines, rates


def attention_section(backend: ggml.Backend, args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    rows = {f"lva {path}": attention_seconds(backend, path, args.runs) for path in ours("attention")}
    rows["ggml flash attention (F16 K/V), encoder order, no mask"] = attention_seconds(backend, GGML_FLASH_ATTENTION,
                                                                                       args.runs)
    rows["ggml flash attention (F16 K/V), tile-major with Meta's mask"] = attention_seconds(
        backend, GGML_FLASH_ATTENTION, args.runs, masked=True)
    peers = torch_peer("torch_attention.py", args.reference_python, args.threads, args.runs)
    if isinstance(peers, dict):
        rows.update({f"torch {peers['torch']} SDPA, {variant}": s for variant, s in peers["seconds"].items()})
    lines = ["| attention | s | GFLOP/s |", "|---|--:|--:|"]
    lines += [f"| {label} | {seconds:.2f} | {ATTENTION_FLOP / seconds / 1e9:.0f} |" for label, seconds in rows.items()]
    if isinstance(peers, str):
        lines.append(f"\n({peers})")
    return lines, {label: ATTENTION_FLOP / seconds / 1e9 for label, seconds in rows.items()}


def targets(products: dict[str, float], attention: dict[str, float]) -> list[str]:
    """The speed issue's three targets, measured on this CPU in this run."""
    def best(rates: dict[str, float], prefix: str) -> tuple[str, float]:
        found = {label: rate for label, rate in rates.items() if label.startswith(prefix)}
        return max(found.items(), key=lambda item: item[1]) if found else ("none", 0.0)
    torch_fp32 = next((r for label, r in products.items() if "float32" in label), None)
    sdpa_fp32 = next((r for label, r in attention.items() if "float32, HF's mask" in label), None)
    f32_label, f32_rate = best(products, "lva f32@")
    int8_label, int8_rate = best(products, "lva int8@")
    attention_label, attention_rate = best(attention, "lva f32@")
    lines = ["| target | path | GFLOP/s (GOP/s) against required | result |", "|---|---|---|---|"]
    if torch_fp32:
        lines.append(f"| F32 products >= {F32_PRODUCTS_TARGET} x torch fp32 Linear ({torch_fp32:.0f}) | {f32_label} | "
                     f"{verdict(f32_rate, F32_PRODUCTS_TARGET * torch_fp32)} |")
    if sdpa_fp32:
        lines.append(f"| F32 attention >= torch SDPA fp32, HF's mask ({sdpa_fp32:.0f}) | {attention_label} | "
                     f"{verdict(attention_rate, F32_ATTENTION_TARGET * sdpa_fp32)} |")
    lines.append(f"| int8 products >= {INT8_TARGET} x the F32 path ({f32_rate:.0f}) | {int8_label} | "
                 f"{verdict(int8_rate, INT8_TARGET * f32_rate) if int8_rate else 'no VNNI here: not run'} |")
    return lines


def layer_section(backend: ggml.Backend, args: argparse.Namespace, paths: Paths) -> list[str]:
    rng = np.random.default_rng(5)
    layer, memory = random_layer(backend, Q.F16, rng)
    copied, copies = with_copies(backend, layer, paths)
    with copies, memory:
        whole = time_layer(backend, copied, paths, args.runs)
        without = time_layer(backend, copied, paths, args.runs, without_attention=True)
        parts = layer_parts(backend, copied, paths, args.runs)
    total = sum(parts.values())
    lines = [f"The layer as the runtime runs it here ({paths}): {whole:.2f} s, {without:.2f} s of it outside the "
             f"attention; x 40 = {whole * LAYERS_PER_ENCODE:.0f} s. Its parts, each timed alone:", "",
             "| part | s | share of the sum |", "|---|--:|--:|"]
    lines += [f"| {part} | {s:.3f} | {100 * s / total:.0f} % |" for part, s in parts.items()]
    lines.append(f"| sum of the parts | {total:.3f} | |")
    return lines


def report(args: argparse.Namespace) -> str:
    backend = ggml.Backend(args.threads, ggml.cpu_device())
    paths = kernel_choice.choose(args.threads, lambda stage, f: None)
    product_lines, product_rates = products_section(backend, args)
    attention_lines, attention_rates = attention_section(backend, args)
    lines = [f"Measured {datetime.date.today().isoformat()} by `python bench/vision_layer_bench.py` on {machine()}, "
             f"{args.threads} threads, best of {args.runs} after one untimed run. One layer: {TOKENS} tokens (4 "
             f"tiles, the real ones first), {PRODUCTS_FLOP / 1e9:.0f} GFLOP of matrix products and "
             f"{ATTENTION_FLOP / 1e9:.0f} GFLOP of attention; a 4-tile encode is {LAYERS_PER_ENCODE} layers.", "",
             *targets(product_rates, attention_rates), "", *product_lines, "",
             f"Attention of one layer ({ATTENTION_FLOP / 1e9:.0f} GFLOP: the pairs Meta's mask keeps; torch and the "
             f"masked flash attention also compute the few masked pairs):", "", *attention_lines, "",
             *layer_section(backend, args, paths)]
    backend.close()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
