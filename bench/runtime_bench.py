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

It prints PASS/FAIL for each target of the runtime issue:

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
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the synthetic checkpoint writer lives in tests/, which is not installed

import llama_cpp  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from PIL import Image  # noqa: E402

from assistant import load_model  # noqa: E402
from models import ggml  # noqa: E402
from convert.pipeline import convert, output_paths  # noqa: E402
from tests.synthetic_checkpoint import eleven_b_config, tensor_shapes, write_checkpoint  # noqa: E402

from report import DOCS, emulation_note, machine, write_section  # noqa: E402

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

QUANT = "Q4_K_M"
N_CTX = 1024
STOCK_LABEL = "stock llama.cpp, text only"
SHARD_BYTES = 2 * 10**9
DEFAULT_REFERENCE_PYTHON = Path("/work/refvenv/bin/python")
BANDWIDTH_BYTES = 2 * 10**9          # far larger than any cache
IMAGE_SIZES = {"1 tile": (500, 400), "4 tiles": (1100, 1100)}   # (width, height) -> 1x1 and 2x2 canvases
IMAGE_ONLY_CROSS_TENSORS = ("attn_k.weight", "attn_v.weight", "attn_k_norm.weight")
F16_BYTES = 2                        # the image K/V are F16 unless the cross layers are F32
HOOK_TARGET = 0.05
DECODE_TARGET = 0.9
ENCODE_TARGET = 0.6
MB, GB, MiB = 10**6, 10**9, 2**20


@dataclass(frozen=True)
class Depth:
    """How many layers the synthetic checkpoint has; every width is the real 11B one."""

    name: str
    text_layers: int                 # including the cross-attention layers, as in config.json
    cross_layers: tuple[int, ...]
    vision_layers: int               # local encoder layers
    global_layers: int

    def config(self) -> dict:
        return eleven_b_config(self.text_layers, list(self.cross_layers), self.vision_layers, self.global_layers)

    def describe(self) -> str:
        n_cross = len(self.cross_layers)
        return (f"{self.text_layers} text layers ({self.text_layers - n_cross} self-attention + {n_cross} "
                f"cross-attention at {list(self.cross_layers)}), {self.vision_layers} local + "
                f"{self.global_layers} global vision layers")


# The real 11B model: 40 text layers (32 self + 8 cross), 32 local + 8 global vision layers. The vision
# tower is at full depth, since its cost per image is what is measured; the text tower is shallower to
# fit this machine's disk and time, which leaves every per-layer cost and every ratio below meaningful.
FULL = Depth("full-vision", 10, (3, 8), 32, 8)
QUICK = Depth("quick", 4, (1,), 4, 1)


@dataclass
class Pair:
    """The converted files and what they hold."""

    text: Path
    vision: Path
    build_seconds: float | None      # None: reused from an earlier run
    convert_seconds: float | None
    checkpoint_bytes: int
    text_tensor_types: str = ""
    vision_tensor_types: str = ""


@dataclass
class Encode:
    """One image: cold encode times (cache cleared before each), a cache hit, and the stages of the best run."""

    label: str
    size: tuple[int, int]
    tiles: int
    image_tokens: int
    seconds: list[float]
    cached_seconds: float
    stages: list[tuple[str, float]]  # (stage, seconds) of the fastest cold run

    @property
    def best(self) -> float:
        return min(self.seconds)


@dataclass
class Rate:
    """Prefill and decode of one configuration; the best of `repeats` runs of each."""

    label: str
    prompt_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    hook: HookTime | None = None

    @property
    def prefill_rate(self) -> float:
        return self.prompt_tokens / self.prefill_seconds

    @property
    def decode_rate(self) -> float:
        return self.decode_tokens / self.decode_seconds


@dataclass
class HookTime:
    """Time inside the cb_eval callback while decoding, and how much of it was ggml running cross layers."""

    tokens: int
    calls: int
    callback_seconds: float
    graph_seconds: float             # scratch.run of the cross-layer graphs: real work, not overhead

    @property
    def python_seconds(self) -> float:
        return self.callback_seconds - self.graph_seconds


@dataclass
class Bytes:
    """What one decoded token reads: weights (llama.cpp's and the cross layers') and the image K/V."""

    text_weights: int                # text GGUF tensors except token_embd (a row lookup, not a read of it all)
    cross_weights: int               # cross.blk.* in the vision file, less attn_k/attn_v (image side only)
    n_cross: int
    kv_heads: int
    head_dim: int
    cross_file_bytes: int            # every cross.blk.* tensor

    def image_kv(self, image_tokens: int) -> int:
        return self.n_cross * 2 * self.kv_heads * self.head_dim * image_tokens * F16_BYTES

    def with_cross(self, image_tokens: int) -> int:
        return self.text_weights + self.cross_weights + self.image_kv(image_tokens)


@dataclass
class Reference:
    seconds: float | None
    note: str
    details: dict = field(default_factory=dict)


@dataclass
class Results:
    depth: Depth
    threads: int
    pair: Pair
    bandwidths: dict[str, float]     # bytes/s per numpy reduction, `threads` threads unless named

    @property
    def bandwidth(self) -> float:
        return max(self.bandwidths.values())
    bytes: Bytes
    encodes: list[Encode]
    rates: list[Rate]                # stock first, then ours text-only, then ours with each image
    peak_rss_kib: int
    reference: Reference
    image_position: int              # of `<|image|>` in the prompt
    repeats: int


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
    read_bytes = bytes_per_token(pair)
    images = {label: make_image(*size, seed=i) for i, (label, size) in enumerate(IMAGE_SIZES.items())}

    model = load_model(pair.text, n_ctx=N_CTX, n_threads=threads, kv_cache_type="f16")
    timer = install_hook_timer(model)
    encodes = [measure_encode(model, label, image, args.encode_runs) for label, image in images.items()]
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
    rates = [_best(label_runs) for label_runs in runs.values()]
    reference = run_reference(args.reference_python, depth, threads)
    return Results(depth, threads, pair, bandwidths, read_bytes, encodes, rates, peak_rss,
                   reference, image_ids.index(model.image_token_id), args.repeats)


# ------------------------------------------------------------------------------------------ the model files


def prepare_pair(depth: Depth, work: Path, threads: int, reuse: bool) -> Pair:
    """Build the checkpoint and convert it (each in a child process), then delete the checkpoint.

    Children keep this process's peak RSS free of the builder's and the quantizer's memory, so the
    figure reported is the runtime's. Only the converted pair stays on disk.
    """
    source = work / f"synthetic-11b-{depth.name}"
    out = work / "converted"
    paths = output_paths(out, source.name, QUANT)
    checkpoint_bytes = 2 * sum(int(np.prod(s)) for s in tensor_shapes(depth.config()).values())
    if reuse and paths.text.exists() and paths.vision.exists():
        print(f"reusing {paths.text} and {paths.vision}", flush=True)
        return describe_pair(Pair(paths.text, paths.vision, None, None, checkpoint_bytes))
    check_disk(work, checkpoint_bytes)
    print(f"building the checkpoint ({depth.describe()}, {checkpoint_bytes / GB:.1f} GB) in {source}", flush=True)
    started = time.perf_counter()
    in_child(write_checkpoint, source, depth.config(), seed=0, shard_bytes=SHARD_BYTES)
    build_seconds = time.perf_counter() - started
    print(f"  built in {build_seconds:.0f} s; converting to {QUANT}", flush=True)
    started = time.perf_counter()
    try:
        in_child(convert_pair, str(source), out, threads)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    convert_seconds = time.perf_counter() - started
    print(f"  converted in {convert_seconds:.0f} s", flush=True)
    return describe_pair(Pair(paths.text, paths.vision, build_seconds, convert_seconds, checkpoint_bytes))


def convert_pair(source: str, out: Path, threads: int) -> None:
    convert(source, out, quant=QUANT, force=True, threads=threads, progress=False)


def check_disk(work: Path, checkpoint_bytes: int) -> None:
    """The checkpoint, the unquantized text file the quantizer reads, and the outputs exist at once."""
    needed = int(2.3 * checkpoint_bytes)
    free = shutil.disk_usage(work).free
    print(f"disk: {free / GB:.0f} GB free in {work}, about {needed / GB:.0f} GB needed", flush=True)
    if free < needed:
        raise SystemExit(f"not enough disk in {work}: {free / GB:.1f} GB free, about {needed / GB:.1f} GB needed")


def describe_pair(pair: Pair) -> Pair:
    pair.text_tensor_types = _type_summary(GGUFReader(pair.text), lambda n: n.startswith("blk."))
    vision = GGUFReader(pair.vision)
    pair.vision_tensor_types = (f"tower {_type_summary(vision, lambda n: n.startswith('v.'))}; cross layers "
                                f"{_type_summary(vision, lambda n: n.startswith('cross.blk.'))}")
    return pair


def _type_summary(reader: GGUFReader, wanted: Callable[[str], bool]) -> str:
    """'Q4_K 62 %, Q6_K 31 %, ...' of the matrices' bytes (vectors are F32 everywhere)."""
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        if wanted(t.name) and len(t.shape) > 1:
            by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    total = sum(by_type.values()) or 1
    return ", ".join(f"{name} {100 * n / total:.0f} %" for name, n in sorted(by_type.items(), key=lambda kv: -kv[1]))


def in_child(function: Callable, *args, **kwargs):
    """Run `function` in a forked process and return its result; fork happens before llama.cpp threads exist."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def target() -> None:
        send.send(function(*args, **kwargs))

    child = context.Process(target=target)
    child.start()
    result = receive.recv() if receive.poll(None) else None
    child.join()
    if child.exitcode:
        raise RuntimeError(f"{function.__name__} failed in its child process (exit {child.exitcode})")
    return result


# ------------------------------------------------------------------------------------------ bandwidth and bytes


def measure_bandwidth(threads: int) -> dict[str, float]:
    """Bytes/s at which numpy reads a 2 GB float32 array, best of 3, per reduction, on `threads` threads.

    Each thread reduces its own chunk (numpy releases the GIL inside), as llama.cpp's threads each read
    their share of the weights. Which reduction reads fastest depends on the CPU: numpy's pairwise
    `sum` is partly limited by arithmetic on some cores, BLAS `sdot` of a chunk with itself (each
    element loaded once) usually is not; the fastest one is the best lower bound on the bandwidth.
    The single-threaded `sum` is kept for comparison with earlier figures.
    """
    array = np.ones(BANDWIDTH_BYTES // 4, dtype=np.float32)
    chunks = np.array_split(array, threads)
    kernels = {"sum": np.sum, "max": np.max, "dot": lambda c: np.dot(c, c)}
    rates = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, kernel in kernels.items():
            rates[name] = array.nbytes / _best_of(3, lambda: list(pool.map(kernel, chunks)))
    rates["sum, 1 thread"] = array.nbytes / _best_of(3, lambda: array.sum())
    return rates


def _best_of(n: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(n):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def bytes_per_token(pair: Pair) -> Bytes:
    """Weight bytes a decoded token reads, from the GGUF tensor tables.

    llama.cpp reads every matrix of the text file once per token except the token embedding, of which
    it reads one row. The cross layers add their own matrices, except K and V, which project the image
    once when it is encoded, and, per layer, the image's K and V.
    """
    text = GGUFReader(pair.text)
    text_weights = sum(int(t.n_bytes) for t in text.tensors if t.name != "token_embd.weight")
    vision = GGUFReader(pair.vision)
    cross = [t for t in vision.tensors if t.name.startswith("cross.blk.")]
    per_token = [t for t in cross if not t.name.endswith(IMAGE_ONLY_CROSS_TENSORS)]
    n_cross = len({t.name.split(".")[2] for t in cross})
    meta = {f.name: f.contents() for f in vision.fields.values()}
    heads = _meta(meta, "attention.head_count")
    kv_heads = _meta(meta, "attention.head_count_kv")
    hidden = _meta(meta, "embedding_length")
    return Bytes(text_weights, sum(int(t.n_bytes) for t in per_token), n_cross, kv_heads, hidden // heads,
                 sum(int(t.n_bytes) for t in cross))


def _meta(meta: dict, suffix: str) -> int:
    """A text hyperparameter from the vision file's metadata, whatever its architecture prefix."""
    for key, value in meta.items():
        if key.endswith(suffix) and "vision" not in key:
            return int(value)
    raise KeyError(suffix)


# ------------------------------------------------------------------------------------------ images


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """Random RGB pixels: encoding costs the same whatever the content."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def forget_image(model, key: str) -> None:
    """Drop one image from the runtime's in-memory cache, so that the next encode_image really encodes it.

    Only that image: the others stay cached, so the decode runs later find every image encoded.
    """
    model.images.forget(key)


def measure_encode(model, label: str, image: Image.Image, runs: int) -> Encode:
    """Cold encodes (this image dropped from the cache before each), the stages of the fastest, a cache hit.

    The progress callback fires after preprocessing and after each stage of `models.mllama.vision.encode`
    (embeddings, each local layer, each global layer, projection + cross-layer K/V), so differences of
    its timestamps show where the time goes. Each image is new to the model when first encoded here, so
    the first run is cold too.
    """
    tiles = model.preprocess(image).num_tiles
    seconds, best_stages, key = [], [], None
    for run in range(runs):
        if key is not None:
            forget_image(model, key)
        stamps: list[float] = []
        started = time.perf_counter()
        key, kv = model.encode_image(image, progress=lambda _what, _fraction: stamps.append(time.perf_counter()))
        elapsed = time.perf_counter() - started
        if not seconds or elapsed < min(seconds):
            best_stages = _stages(model, started, stamps)
        seconds.append(elapsed)
        print(f"encode {label} ({image.size[0]}x{image.size[1]}, {tiles} tiles), run {run + 1}: {elapsed:.1f} s",
              flush=True)
    started = time.perf_counter()
    model.encode_image(image)
    cached = time.perf_counter() - started
    return Encode(label, image.size, tiles, kv.num_tokens, seconds, cached, best_stages)


def _stages(model, started: float, stamps: list[float]) -> list[tuple[str, float]]:
    v = model.vision.hp.vision
    names = (["preprocessing", "embeddings"] + [f"local {i}" for i in range(v.num_hidden_layers)]
             + [f"global {i}" for i in range(v.num_global_layers)] + ["projection + cross-layer K/V"])
    times = np.diff([started, *stamps])
    return list(zip(names, times.tolist()))


# ------------------------------------------------------------------------------------------ prefill and decode


def build_prompts(model, n_tokens: int) -> tuple[list[int], list[int]]:
    """A chat-formatted prompt of exactly n_tokens with `<|image|>` near the start, and the same without it.

    The text-only prompt swaps the image token for an ordinary one, so every configuration evaluates
    the same number of rows.
    """
    head = model.tokenize("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>")
    sentence = "Describe the picture in detail, then list every object you can see in it and its colour. "
    body = model.tokenize(sentence * (1 + n_tokens // 16))
    image_ids = (head + body)[:n_tokens]
    filler = model.tokenize("\n")[0]
    text_ids = [filler if t == model.image_token_id else t for t in image_ids]
    return image_ids, text_ids


class CallbackTimer:
    """Wraps a function: counts calls and the wall time spent inside them."""

    def __init__(self, function: Callable) -> None:
        self.function = function
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


@dataclass
class HookTimer:
    callback: CallbackTimer          # the hook's cb_eval callback
    graphs: CallbackTimer            # every ggml.Scratch.run in the process


def install_hook_timer(model) -> HookTimer:
    """Time the cb_eval callback and, inside it, the ggml runs of the cross-layer graphs.

    The ctypes callback object is built in CrossAttentionHook.__init__ from the bound method, so it is
    rebuilt around a timing wrapper; contexts pick it up when they are created, lazily, on first use.
    The hook runs its cross-layer graphs through `ggml.Scratch.run`, which is wrapped for the whole
    class: while decoding with an already encoded image nothing else runs graphs, so that time is the
    cross layers' arithmetic (real work), and the rest of the callback's time is Python bookkeeping
    (the overhead). The ctypes transitions into and out of the callback are outside both timers; the
    text-only row against stock llama.cpp shows their cost.
    """
    if model._ctx is not None:
        raise RuntimeError("the hook timer must be installed before the runtime creates its llama.cpp context")
    callback = CallbackTimer(model.hook._on_node)
    model.hook.callback = llama_cpp.ggml_backend_sched_eval_callback(callback)
    graphs = CallbackTimer(ggml.Scratch.run)
    ggml.Scratch.run = lambda scratch, graph, inputs=None: graphs(scratch, graph, inputs)
    return HookTimer(callback, graphs)


def forget_context(model) -> None:
    """Make the next prompt evaluate from position 0, as a new conversation would.

    The runtime keeps its llama.cpp context and reuses the longest prefix it already holds; with no
    tokens recorded, it clears the KV cache and evaluates the whole prompt, in the same context.
    """
    model._ctx_tokens = []


def runtime_once(model, timer: HookTimer, label: str, ids: list[int], image, decode_tokens: int) -> Rate:
    """Prefill = time to the first token (the image is already encoded: a cache hit); decode = the rest.

    After the first token, each step of generate_tokens evaluates the previous token and samples the
    next; the generator's last step evaluates the last token before stopping, so `decode_tokens + 1`
    tokens asked for make `decode_tokens + 1` evaluations after the prompt, which is the count used.
    """
    forget_context(model)
    tokens = model.generate_tokens(ids, image=image, max_tokens=decode_tokens + 1, temperature=0,
                                   stop_at_end_of_turn=False)
    started = time.perf_counter()
    next(tokens)
    prefilled = time.perf_counter()
    timer.callback.reset()
    timer.graphs.reset()
    steps = sum(1 for _ in tokens) + 1
    decoded = time.perf_counter()
    hook = HookTime(steps, timer.callback.calls, timer.callback.seconds, timer.graphs.seconds)
    return _report(Rate(label, len(ids), prefilled - started, steps, decoded - prefilled, hook))


def _report(rate: Rate) -> Rate:
    hook = "" if rate.hook is None else (f", hook {1000 * rate.hook.callback_seconds / rate.hook.tokens:.2f} "
                                         f"ms/token ({1000 * rate.hook.python_seconds / rate.hook.tokens:.2f} Python)")
    print(f"  {rate.label}: prefill {rate.prefill_rate:.1f} tok/s, decode {rate.decode_rate:.2f} tok/s{hook}",
          flush=True)
    return rate


def _best(runs: list[Rate]) -> Rate:
    """The fastest prefill and the fastest decode, which may come from different runs."""
    prefill = min(runs, key=lambda r: r.prefill_seconds)
    decode = max(runs, key=lambda r: r.decode_rate)
    return Rate(prefill.label, prefill.prompt_tokens, prefill.prefill_seconds, decode.decode_tokens,
                decode.decode_seconds, decode.hook)


class StockLlama:
    """Stock llama-cpp-python on the same text GGUF, no hook: `Llama.eval`, greedy on llama.cpp's logits.

    `Llama` is built as a user would build it (every layer offloaded, as lva does, on a GPU build; its
    defaults otherwise); the argmax over the last row's logits is the greedy step (our runtime uses
    llama.cpp's greedy sampler, the same work).
    """

    def __init__(self, text_path: Path, threads: int) -> None:
        self.llm = llama_cpp.Llama(str(text_path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                                   n_gpu_layers=-1, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.llm.eval([self.llm.token_bos()] * 8)              # creates the compute buffers, touches the weights

    def _greedy(self) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def once(self, ids: list[int], decode_tokens: int) -> Rate:
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(ids)
        token = self._greedy()
        prefilled = time.perf_counter()
        for _ in range(decode_tokens + 1):
            self.llm.eval([token])
            token = self._greedy()
        decoded = time.perf_counter()
        return _report(Rate(STOCK_LABEL, len(ids), prefilled - started, decode_tokens + 1, decoded - prefilled))

    def close(self) -> None:
        self.llm.close()


# ------------------------------------------------------------------------------------------ the HF reference


def run_reference(choice: str, depth: Depth, threads: int) -> Reference:
    """HF's bf16 vision tower + projector on 4 tiles, timed by bench/hf_vision_reference.py in a child."""
    python = _reference_python(choice)
    if isinstance(python, Reference):
        print(python.note, flush=True)
        return python
    command = [str(python), str(REPO / "bench" / "hf_vision_reference.py"), "--threads", str(threads),
               "--local-layers", str(depth.vision_layers), "--global-layers", str(depth.global_layers)]
    print(f"HF reference: {' '.join(command)}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Reference(None, f"the HF reference failed (exit {done.returncode}): {tail}")
    details = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"HF reference: {details['seconds']:.1f} s", flush=True)
    return Reference(details["seconds"], f"torch {details['torch']}, transformers {details['transformers']}, "
                                         f"attention `{details['attn_implementation']}`", details)


def _reference_python(choice: str) -> Path | Reference:
    if choice == "none":
        return Reference(None, "HF reference skipped (--reference-python none)")
    python = DEFAULT_REFERENCE_PYTHON if choice == "auto" else Path(choice)
    if not python.exists():
        return Reference(None, f"HF reference skipped: {python} does not exist (--reference-python PYTHON)")
    probe = subprocess.run([str(python), "-c", "import torch, transformers"], capture_output=True, text=True)
    if probe.returncode:
        return Reference(None, f"HF reference skipped: {python} cannot import torch and transformers")
    return python


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
