"""Runtime benchmark: image encoding, prefill and decoding of `load_model` against stock llama.cpp.

One run builds a synthetic checkpoint at the real Llama 3.2 11B Vision widths, with the full vision
tower (32 local + 8 global layers) and a shallower text tower, converts it to Q4_K_M, and measures on
the same thread count:

- image encoding, 1 and 4 tiles, from a cold in-memory cache, and a cache hit;
- prompt (prefill) and decode rates with an image, against stock llama-cpp-python on the same text
  GGUF (`llama_cpp.Llama`, no hook), and our runtime without an image;
- the time spent inside the cross-attention hook's callback per decoded token;
- the process's peak RSS;
- the machine's memory read bandwidth, the bytes a decoded token reads with and without the cross
  layers, and the decode rate that ratio allows;
- HF transformers' vision tower + projector in bf16 on 4 tiles, in a child process with another
  interpreter (torch is not a dependency of lva).

It prints PASS/FAIL for each target of the runtime issue. What each part measures lives beside it:
synthetic_pair.py (the model), encode_timing.py, decode_timing.py, memory_traffic.py, hf_reference.py;
this file runs them in order and writes the report.

    python bench/runtime_bench.py                  # prints the tables (about 15 minutes on 2 cores)
    python bench/runtime_bench.py --write-docs     # and rewrites the runtime section of docs/PERFORMANCE.md
    LVA_ATTENTION=avx2 /work/venv-avx2/bin/python bench/runtime_bench.py --work /data/rb --reuse \
        --reference-python none --write-docs --section runtime-avx2     # as an AVX2-only CPU (first_answer_bench)
    python bench/runtime_bench.py --work /data/rb --reuse   # keep the converted pair, reuse it next time
    python bench/runtime_bench.py --quick          # shallow vision tower: checks the script, not the runtime
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the synthetic checkpoint writer lives in tests/, which is not installed

from assistant import load_model  # noqa: E402
from decode_timing import (N_CTX, STOCK_LABEL, Rate, StockLlama, best_rate, build_prompts,  # noqa: E402
                           install_hook_timer, runtime_once)
from encode_timing import Encode, measure_encode  # noqa: E402
from hf_reference import DEFAULT_REFERENCE_PYTHON, Reference, run_reference  # noqa: E402
from memory_traffic import Bytes, bytes_per_token, measure_bandwidth  # noqa: E402
from report import DOCS, emulation_note, machine, write_section  # noqa: E402
from synthetic_pair import FULL, QUANT, QUICK, Depth, Pair, in_child, prepare_pair  # noqa: E402

HEADING = "## Runtime (`load_model`, images, decoding)"
INTRO = """\
The issue this answers: with an image bound, decoding must stay close to stock llama.cpp on the same
text GGUF, slowed only by the extra bytes the cross-attention layers read (decode with an image
≥ 0.9 × stock text-only rate × bytes per token without / with the cross layers), the Python hook
that injects those layers must cost under 5 % of decode time, and encoding a 4-tile image must take
at most 0.6 × the time of HF transformers' vision tower + projector in bf16. The script below also
reports image encoding from a cold and a warm cache, prompt (prefill) rates and the peak RSS. It
builds and converts a synthetic checkpoint first, so it needs about 20 GB of free disk while it
runs and takes about 15 minutes here. To rerun:

    python bench/runtime_bench.py                # print the tables
    python bench/runtime_bench.py --write-docs   # and rewrite the generated part below
    python bench/runtime_bench.py --reference-python /path/to/venv/bin/python   # torch + transformers for HF"""

IMAGE_SIZES = {"1 tile": (500, 400), "4 tiles": (1100, 1100)}   # (width, height) -> 1x1 and 2x2 canvases
HOOK_TARGET = 0.05
DECODE_TARGET = 0.9
ENCODE_TARGET = 0.6
MB, GB, MiB = 10**6, 10**9, 2**20


@dataclass
class Results:
    depth: Depth
    threads: int
    pair: Pair
    bandwidths: dict[str, float]     # bytes/s per numpy reduction, `threads` threads unless named
    bytes: Bytes
    encodes: list[Encode]
    rates: list[Rate]                # stock first, then ours text-only, then ours with each image
    peak_rss_kib: int
    reference: Reference
    image_position: int              # of `<|image|>` in the prompt
    repeats: int

    @property
    def bandwidth(self) -> float:
        return max(self.bandwidths.values())


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    args = parse_args()
    depth = QUICK if args.quick else FULL
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lva-runtime-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        pair = prepare_pair(depth, work, args.threads, args.reuse)
        results = run_all(depth, pair, args)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report = "\n".join([*emulation_note(), render_report(results)])
    print(report)
    verdicts = [passed for *_, passed in targets(results)]
    print(f"\ntargets: {verdicts.count(True)} PASS, {verdicts.count(False)} FAIL, "
          f"{verdicts.count(None)} not measured")
    if args.write_docs:
        write_section(args.section, report, f"{HEADING}\n\n{INTRO}" if args.section == "runtime" else "")
        print(f"wrote the {args.section} section of {DOCS.relative_to(REPO)}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for everything: llama.cpp, ggml, numpy, torch (default: all cores)")
    parser.add_argument("--work", metavar="DIR",
                        help="where the checkpoint and the converted pair go (default: a temporary directory)")
    parser.add_argument("--reuse", action="store_true",
                        help="use the converted pair already in --work instead of building it again")
    parser.add_argument("--quick", action="store_true",
                        help=f"a shallow checkpoint ({QUICK.describe()}) to check the script quickly")
    parser.add_argument("--prompt-tokens", type=int, default=200, help="prompt length for prefill (default 200)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens to decode (default 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds of prefill/decode runs, best kept (default 3)")
    parser.add_argument("--encode-runs", type=int, default=1, help="cold encodes per image, best kept (default 1)")
    parser.add_argument("--reference-python", default="auto", metavar="PYTHON",
                        help=f"interpreter with torch + transformers for the HF reference; 'auto': "
                             f"{DEFAULT_REFERENCE_PYTHON} if it has them; 'none': skip")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"rewrite the runtime section of {DOCS.relative_to(REPO)} with the results")
    parser.add_argument("--section", default="runtime",
                        help="the section of PERFORMANCE.md --write-docs writes (runtime-avx2: the emulated AVX2 run)")
    args = parser.parse_args()
    if args.write_docs and args.quick:
        parser.error("--write-docs records the full-depth vision tower; drop --quick")
    if args.reuse and not args.work:
        parser.error("--reuse needs --work DIR")
    return args


def run_all(depth: Depth, pair: Pair, args: argparse.Namespace) -> Results:
    """Every measurement, in an order that keeps them apart.

    The bandwidth probe runs in a child process (its 2 GB array would otherwise be this process's peak
    RSS). Our runtime encodes and makes one uncounted pass over its configurations before stock
    llama.cpp maps the text file a second time, so the peak RSS read then is the runtime's alone. The
    counted rounds interleave stock and ours, so that noise from other work on the machine falls on
    all of them alike. The HF reference runs last, in its own interpreter.
    """
    threads = args.threads
    bandwidths = in_child(measure_bandwidth, threads)
    print("memory read bandwidth, GB/s: " + ", ".join(f"{k} {v / GB:.1f}" for k, v in bandwidths.items()),
          flush=True)
    read_bytes = bytes_per_token(pair.text, pair.vision)

    model = load_model(pair.text, n_ctx=N_CTX, n_threads=threads, kv_cache_type="f16")
    timer = install_hook_timer(model)
    encodes, images = [], {}
    for seed, (label, size) in enumerate(IMAGE_SIZES.items()):
        encode, images[label] = measure_encode(model, label, size, seed, args.encode_runs)
        encodes.append(encode)
    image_ids, text_ids = build_prompts(model, args.prompt_tokens)
    ours = {"lva runtime, text only": (text_ids, None)}
    ours.update({f"lva runtime, image {label}": (image_ids, image) for label, image in images.items()})
    print("warm-up pass (not counted):", flush=True)
    for label, (ids, image) in ours.items():
        runtime_once(model, timer, label, ids, image, args.decode_tokens)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    stock = StockLlama(pair.text, threads)
    runs: dict[str, list[Rate]] = {STOCK_LABEL: [], **{label: [] for label in ours}}
    try:
        for round_ in range(args.repeats):
            print(f"round {round_ + 1} of {args.repeats}:", flush=True)
            runs[STOCK_LABEL].append(stock.once(text_ids, args.decode_tokens))
            for label, (ids, image) in ours.items():
                runs[label].append(runtime_once(model, timer, label, ids, image, args.decode_tokens))
    finally:
        stock.close()
        model.close()
    rates = [best_rate(label_runs) for label_runs in runs.values()]
    reference = run_reference(args.reference_python, depth, threads)
    return Results(depth, threads, pair, bandwidths, read_bytes, encodes, rates, peak_rss,
                   reference, image_ids.index(model.image_token_id), args.repeats)


# ------------------------------------------------------------------------------------------ the report


def render_report(r: Results) -> str:
    """The runtime section, in Markdown (which also reads fine in a terminal)."""
    parts = [render_setup(r), render_encodes(r), render_stages(r), render_rates(r), render_bytes(r),
             render_targets(r)]
    return "\n\n".join(parts)


def render_setup(r: Results) -> str:
    pair = r.pair
    made = ("reused from an earlier run" if pair.build_seconds is None else
            f"built in {pair.build_seconds:.0f} s and converted in {pair.convert_seconds:.0f} s")
    reference = r.reference.note
    return (f"Measured {datetime.date.today().isoformat()} by `python bench/runtime_bench.py"
            f"{' --write-docs' if r.depth is FULL else ' --quick'}` on {machine()}; "
            f"llama-cpp-python {version('llama-cpp-python')}, "
            f"gguf {version('gguf')}, numpy {np.__version__}, Python {platform.python_version()}; HF reference: "
            f"{reference}. Every part runs on {r.threads} threads. The machine is shared with other work, so "
            f"timings are noisy (10–15 % from run to run); compare ratios rather than digits.\n\n"
            f"A synthetic random checkpoint at the real Llama 3.2 11B Vision widths: {r.depth.describe()} "
            f"({pair.checkpoint_bytes / GB:.1f} GB of bf16), converted to {QUANT} ({made}): text file "
            f"{pair.text.stat().st_size / GB:.2f} GB ({pair.text_tensor_types} of the layer matrices), vision "
            f"file {pair.vision.stat().st_size / GB:.2f} GB ({pair.vision_tensor_types}). "
            + ("The vision tower is at full depth, so encode times are the real model's. " if r.depth is FULL else
               "The vision tower is shallow (`--quick`), so encode times are not the real model's. ")
            + "The real model has 32 self-attention + 8 cross-attention text layers: its prefill and decode "
              "rates are lower than these, while the per-layer costs and the decode target, a ratio of bytes "
              "per token, carry over. The text file keeps llama.cpp's Q4_K_M mix; the cross layers take Q4_K.")


def render_encodes(r: Results) -> str:
    rows = ["Image encoding (`encode_image`, the image new to the in-memory cache in each cold run; best of "
            f"{len(r.encodes[0].seconds)}; the cache hit is the same call again):\n",
            "| image | tiles | image tokens | cold s | cache hit ms |", "|---|--:|--:|--:|--:|"]
    for e in r.encodes:
        runs = " / ".join(f"{s:.1f}" for s in e.seconds)
        rows.append(f"| {e.label} ({e.size[0]}×{e.size[1]}) | {e.tiles} | {e.image_tokens} | "
                    f"{e.best:.1f}{f' ({runs})' if len(e.seconds) > 1 else ''} | {1000 * e.cached_seconds:.1f} |")
    ref = r.reference.seconds
    if ref is not None:
        four = r.encodes[-1].best
        rows.append(f"| HF transformers bf16, vision tower + projector | 4 | 6404 | {ref:.1f} | – |")
        rows.append(f"\nOurs / HF bf16 on 4 tiles: {four / ref:.2f}.")
    return "\n".join(rows)


def render_stages(r: Results) -> str:
    """Where the encode time goes, per stage group, and an estimate of attention against matrix products.

    The encoder always runs all 4 tile slots (1608 tokens each, padding included), so every layer does
    the same matrix products whatever the image. Attention differs: Meta's mask only blocks pairs of two
    padding tokens, and the encoder leaves those pairs out (padding queries attend to the real keys only),
    so a 1-tile image does a fraction of the 4-tile attention work. Two encodes that differ only there
    give the split of a layer's time.
    """
    by_tiles = {e.tiles: e for e in r.encodes}
    four = by_tiles[max(by_tiles)]
    length, real = 1608 * 4, 1601
    d, f = 1280, 5120
    matmul_gflop = 2 * length * (4 * d * d + 2 * d * f) / 1e9
    attention_gflop = 2 * 2 * length * length * d / 1e9
    rows = [f"Stages of the {four.label} encode ({four.best:.1f} s). "
            f"Per layer: ≈ {matmul_gflop:.0f} GFLOP of matrix products and ≈ {attention_gflop:.0f} GFLOP of "
            f"attention (QKᵀ and PV over all {length} tokens of the 4 tile slots):\n",
            "| stage | count | seconds | mean s | share |", "|---|--:|--:|--:|--:|"]
    groups: dict[str, list[float]] = {}
    for name, seconds in four.stages:
        groups.setdefault(name.split(" ")[0] if name.startswith(("local", "global")) else name, []).append(seconds)
    total = sum(s for _, s in four.stages)
    for group, times in groups.items():
        rows.append(f"| {group} | {len(times)} | {sum(times):.1f} | {sum(times) / len(times):.2f} | "
                    f"{100 * sum(times) / total:.0f} % |")
    if 1 in by_tiles and four.tiles == 4:
        one = by_tiles[1]
        t4, t1 = _mean_layer(four), _mean_layer(one)
        pad = length - real
        fraction = (length * length - pad * pad) / (length * length - 28 * 28)   # 4 tiles: 7 pad tokens a tile
        attention = (t4 - t1) / (1 - fraction)
        matmul = t4 - attention
        rows.append(f"\nAttention against matrix products, from the mean encoder layer: {t4:.2f} s with 4 tiles, "
                    f"{t1:.2f} s with 1 tile, which does {100 * fraction:.0f} % of the attention pairs and all "
                    f"the matrix products. So attention ≈ {attention:.2f} s of a layer "
                    f"({100 * attention / t4:.0f} %, {attention_gflop / attention:.0f} GFLOP/s) and the matrix "
                    f"products ≈ {matmul:.2f} s ({matmul_gflop / matmul:.0f} GFLOP/s), an estimate that "
                    f"assumes the matrix products cost the same in both encodes.")
    return "\n".join(rows)


def _mean_layer(e: Encode) -> float:
    times = [s for name, s in e.stages if name.startswith(("local", "global"))]
    return sum(times) / len(times)


def render_rates(r: Results) -> str:
    stock = r.rates[0]
    rows = [f"Prefill ({stock.prompt_tokens}-token prompt, `<|image|>` at position {r.image_position} where "
            f"there is an image, already encoded) and greedy decode ({stock.decode_tokens} tokens evaluated after "
            f"the prompt): the best of {r.repeats} rounds that interleave the four configurations, after one "
            f"uncounted warm-up pass of ours. *Hook* is the time inside the `cb_eval` callback per decoded "
            f"token; *of which ggml* is the cross-attention graphs it runs, the rest is Python (the overhead "
            f"the target bounds):\n",
            "| configuration | prefill tok/s | × stock | decode tok/s | × stock | hook ms/token | of which ggml ms "
            "| Python ms | Python % of decode | callbacks/token |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for rate in r.rates:
        row = (f"| {rate.label} | {rate.prefill_rate:.1f} | {rate.prefill_rate / stock.prefill_rate:.2f} | "
               f"{rate.decode_rate:.2f} | {rate.decode_rate / stock.decode_rate:.2f} |")
        if rate.hook is None:
            row += " – | – | – | – | – |"
        else:
            h, per = rate.hook, 1000 / rate.hook.tokens
            row += (f" {h.callback_seconds * per:.2f} | {h.graph_seconds * per:.2f} | {h.python_seconds * per:.2f} "
                    f"| {100 * h.python_seconds / rate.decode_seconds:.1f} % | {h.calls / h.tokens:.0f} |")
        rows.append(row)
    mapped = (r.pair.text.stat().st_size + r.pair.vision.stat().st_size) / MiB
    rows.append(f"\nPeak RSS of the benchmark process after the runtime's measurements (before stock llama.cpp "
                f"is loaded): {r.peak_rss_kib / 1024:.0f} MiB; it counts the pages of both GGUF files that "
                f"llama.cpp and the vision loader map ({mapped:.0f} MiB together) as they are touched.")
    return "\n".join(rows)


def render_bytes(r: Results) -> str:
    b, stock, bw = r.bytes, r.rates[0], r.bandwidth
    probes = ", ".join(f"`{name}` {rate / GB:.1f}" for name, rate in r.bandwidths.items())
    rows = [f"Memory: numpy reads a 2 GB float32 array at {bw / GB:.1f} GB/s on {r.threads} threads, the "
            f"fastest of its reductions (GB/s, best of 3 each: {probes}). Bytes a decoded token reads: the "
            f"text file's tensors except `token_embd` ({b.text_weights / GB:.3f} GB), plus with an image the "
            f"{b.n_cross} cross layers' tensors ({b.cross_weights / GB:.3f} GB: the {b.cross_file_bytes / GB:.3f} GB "
            f"of `cross.blk.*` less `attn_k`/`attn_v`, which only project the image) and their image K/V "
            f"({b.n_cross} × 2 × {b.kv_heads} heads × {b.head_dim} × image tokens × 2 bytes). *Read rate* is "
            f"bytes per token × measured tok/s:\n",
            "| configuration | GB per token | bandwidth bound tok/s | measured tok/s | % of bound | read rate GB/s |",
            "|---|--:|--:|--:|--:|--:|",
            f"| text only (stock llama.cpp) | {b.text_weights / GB:.3f} | {bw / b.text_weights:.1f} | "
            f"{stock.decode_rate:.2f} | {100 * stock.decode_rate * b.text_weights / bw:.0f} % | "
            f"{stock.decode_rate * b.text_weights / GB:.1f} |"]
    for rate, e in zip(r.rates[2:], r.encodes):
        with_cross = b.with_cross(e.image_tokens)
        rows.append(f"| image, {e.label} ({e.image_tokens} tokens, K/V {b.image_kv(e.image_tokens) / MB:.0f} MB) | "
                    f"{with_cross / GB:.3f} | {bw / with_cross:.1f} | {rate.decode_rate:.2f} | "
                    f"{100 * rate.decode_rate * with_cross / bw:.0f} % | {rate.decode_rate * with_cross / GB:.1f} |")
    rows.append("\nThe cross layers alone, per decoded token: their ggml graphs (*of which ggml* above) read the "
                "cross matrices and the image K/V at")
    rates = []
    for rate, e in zip(r.rates[2:], r.encodes):
        cross = b.cross_weights + b.image_kv(e.image_tokens)
        per_token = rate.hook.graph_seconds / rate.hook.tokens
        rates.append(f"{cross / per_token / GB:.1f} GB/s with {e.label} ({cross / MB:.0f} MB in "
                     f"{1000 * per_token:.2f} ms)")
    rows[-1] += " " + "; ".join(rates) + (f", against {stock.decode_rate * b.text_weights / GB:.1f} GB/s for "
                                          f"llama.cpp's own layers in the stock run.")
    return "\n".join(rows)


def targets(r: Results) -> list[tuple[str, str, str, bool | None]]:
    """(target, required, measured, passed) for each target of the issue; passed None when not measured."""
    b, stock = r.bytes, r.rates[0]
    out = []
    for rate, e in zip(r.rates[2:], r.encodes):
        need = DECODE_TARGET * stock.decode_rate * b.text_weights / b.with_cross(e.image_tokens)
        out.append((f"decode with an image ({e.label})",
                    f"≥ {DECODE_TARGET} × {stock.decode_rate:.2f} × {b.text_weights / GB:.3f} / "
                    f"{b.with_cross(e.image_tokens) / GB:.3f} = {need:.2f} tok/s",
                    f"{rate.decode_rate:.2f} tok/s", rate.decode_rate >= need))
    for rate in r.rates[1:]:
        share = rate.hook.python_seconds / rate.decode_seconds
        out.append((f"hook Python overhead, {rate.label.removeprefix('lva runtime, ')}",
                    f"< {100 * HOOK_TARGET:.0f} % of decode time", f"{100 * share:.1f} %", share < HOOK_TARGET))
    ref, four = r.reference.seconds, r.encodes[-1]
    if ref is None:
        out.append(("4-tile encode vs HF bf16", f"≤ {ENCODE_TARGET} × HF", f"{four.best:.1f} s; HF not run", None))
    else:
        out.append(("4-tile encode vs HF bf16", f"≤ {ENCODE_TARGET} × {ref:.1f} = {ENCODE_TARGET * ref:.1f} s",
                    f"{four.best:.1f} s ({four.best / ref:.2f} × HF)", four.best <= ENCODE_TARGET * ref))
    return out


def render_targets(r: Results) -> str:
    rows = ["Targets:\n", "| target | required | measured | result |", "|---|---|---|---|"]
    for name, required, measured, passed in targets(r):
        verdict = "not measured" if passed is None else ("PASS" if passed else "**FAIL**")
        rows.append(f"| {name} | {required} | {measured} | {verdict} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
