"""Several answers at once: lva's aggregate decode rate with 1, 2, 4, 8 and 16 streams beside stock llama.cpp's
batched decode of the same text file, and how long a request arriving among 3 decoding streams waits.

On the synthetic 11B-width Q4_K_M checkpoint of the first-answer bench (10 text layers, 2 of them
cross-attention, the full vision tower), each stream about a 4-tile image (4 images, repeated past 4
streams), already encoded (so only decoding is timed). In one run, on one machine, 2 threads (the default):

- stock llama.cpp (llama-cpp-python, no lva): the text file, one context with N sequences in a unified KV
  cache, each sequence a 64-token prompt, then 64 steps that decode one token of every sequence;
- lva (`ParallelDecoder`): N requests with their images, prompts as long as stock's, greedy; 64 steps
  where every stream decodes (no prompt rows) are timed;
- the two in turn, twice for each N, the best of each kept (this VM's speed drifts over minutes);
- llama.cpp's own CPU products for the file's largest matrices with 1 to 16 columns: how much dearer
  four tokens are than one where the arithmetic, not the reading of weights, sets the pace;
- stock llama.cpp's 1- and 4-sequence rates under its other settings (weights not repacked, a KV cache per
  sequence, flash attention off): whether any way of running llama.cpp gives four sequences twice one's
  tokens per second on this CPU;
- a request arriving while 3 streams decode: its time to first token, against the same request alone;
- `lva batch` on 16 questions about 4 images (4 each), `--parallel 1` and `--parallel 4`: wall times with
  the images encoded in the run (a fresh LVA_HOME), then again with them found in that home's feature cache
  (the decode phase, the model's load included), and whether both write the same answers.

Targets (the parallel-answers issue): lva's 4-stream speed-up over one stream at least 0.9 x stock's
4-sequence speed-up, and at least 2x; the newcomer's first token within its solo time + 25 %.

    python bench/parallel_bench.py --work /tmp/lva-first-answer --reuse              # about 30 minutes
    python bench/parallel_bench.py --work /tmp/lva-first-answer --reuse --write-docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from assistant import load_model  # noqa: E402
from assistant.runtime.sampling import SamplingParams  # noqa: E402
from assistant.runtime.parallel import ParallelDecoder, Request  # noqa: E402
from models import ggml  # noqa: E402
from first_answer_bench import prepare  # noqa: E402
from report import machine, write_section  # noqa: E402
from synthetic_pair import FULL, make_image  # noqa: E402

STREAMS = (1, 2, 4, 8, 16)             # the targets are at 4; 8 and 16 show where llama.cpp's kernels go on
UNCACHED_BYTES = 256 << 20            # weights that no CPU cache holds
ROUNDS = 2                           # stock and lva measured in turn, the best of each
PRODUCTS = (("ffn_gate/up: Q4_K 4096 → 14336, repacked (q4_K_8x8)", GGMLQuantizationType.Q4_K, 4096, 14336, True),
            ("ffn_down: Q6_K 14336 → 4096", GGMLQuantizationType.Q6_K, 14336, 4096, False),
            ("output: Q6_K 4096 → 128256", GGMLQuantizationType.Q6_K, 4096, 128256, False))
# Stock llama.cpp's other ways to decode several sequences (StockStreams' keywords): what lva could choose.
SETTINGS = (("as lva runs it: weights repacked, one KV cache, flash attention as llama.cpp chooses", {}),
            ("weights not repacked", {"repack": False}),
            ("one KV cache per sequence", {"unified": False}),
            ("flash attention off", {"flash": False}),
            ("one KV cache per sequence, flash attention off", {"unified": False, "flash": False}))
PROMPT_TOKENS, DECODE_TOKENS = 64, 64
SPEEDUP_SHARE, SPEEDUP_FLOOR, NEWCOMER_SLACK = 0.9, 2.0, 1.25
BATCH_QUESTIONS = ("What is in this picture?", "Describe its colours.", "What stands out in it?", "Write a caption.")
BATCH_TOKENS = 32
HEADING = "## Several answers at once (`lva serve --parallel`, `lva batch --parallel`)"


class StockStreams:
    """llama.cpp alone: the text file, one context with `streams` sequences in a unified KV cache, each a
    64-token prompt already evaluated; `rate` decodes one token of every sequence per step. The settings
    lva uses unless told: `repack` (llama.cpp's CPU_REPACK layout for the weights), `unified` (one KV cache
    for every sequence), `flash` (flash attention; None: llama.cpp's choice)."""

    def __init__(self, text: Path, streams: int, threads: int, repack: bool = True, unified: bool = True,
                 flash: bool | None = None) -> None:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers, params.use_extra_bufts = 0, repack
        self.model = llama_cpp.llama_model_load_from_file(str(text).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {text}")
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx, context_params.n_seq_max, context_params.kv_unified = 256 * streams, streams, unified
        if flash is not None:
            context_params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        context_params.n_batch = context_params.n_ubatch = max(256, PROMPT_TOKENS * streams)
        context_params.n_threads = context_params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, context_params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context of {streams} sequences")
        self.batch = llama_cpp.llama_batch_init(PROMPT_TOKENS * streams, 0, 1)
        self.streams, self.position = streams, PROMPT_TOKENS
        self.rng = np.random.default_rng(0)
        self._decode([(self._token(), p, s) for s in range(streams) for p in range(PROMPT_TOKENS)])

    def _token(self) -> int:
        return int(self.rng.integers(1000, 100000))

    def _decode(self, rows: list[tuple[int, int, int]]) -> None:     # (token, position, sequence)
        for i, (token, position, sequence) in enumerate(rows):
            self.batch.token[i], self.batch.pos[i], self.batch.n_seq_id[i] = token, position, 1
            self.batch.seq_id[i][0], self.batch.logits[i] = sequence, True
        self.batch.n_tokens = len(rows)
        if llama_cpp.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def rate(self, steps: int) -> float:
        """Tokens per second over `steps` steps."""
        started = time.perf_counter()
        for _ in range(steps):
            self._decode([(self._token(), self.position, s) for s in range(self.streams)])
            self.position += 1
        return self.streams * steps / (time.perf_counter() - started)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def prompt(model, words: int) -> list[int]:
    text = " ".join(["describe"] * words)
    return model.tokenize("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>" + text +
                          "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def prompt_of_length(model, tokens: int) -> list[int]:
    """A prompt of at least `tokens` ids, as few words over as the tokenizer allows: each stream's context
    as long as stock's, since with one KV cache every row's attention passes over every sequence's cells."""
    words = 0
    while len(ids := prompt(model, words)) < tokens:
        words += 1
    return ids


class LvaStreams:
    """lva's `ParallelDecoder`: `streams` greedy answers, each about an image, their prompts evaluated and
    first tokens out; `rate` times steps where every stream decodes. Past len(images) streams the images
    repeat, never on neighbouring streams, so each stream's rows still read their image's K/V on their own."""

    def __init__(self, model, images: list[Path], streams: int) -> None:
        self.decoder = ParallelDecoder(model, streams, 1024)
        greedy = SamplingParams(temperature=0.0)
        self.streams = streams
        ids = prompt_of_length(model, PROMPT_TOKENS)
        self.answers = [self.decoder.submit(Request(ids, images[i % len(images)], greedy,
                                                    max_tokens=10_000, stop_at_end_of_turn=False))
                        for i in range(streams)]
        while not all(slot.last is not None for slot in self.decoder.slots):
            self.decoder.step()

    def rate(self, steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            self.decoder.step()
        return self.streams * steps / (time.perf_counter() - started)

    def close(self) -> None:
        for answer in self.answers:
            answer.cancel()
        while self.decoder.step():
            pass
        self.decoder.close()


def paired_rates(text: Path, model, images: list[Path], threads: int) -> tuple[dict[int, float], dict[int, float]]:
    """Stock's and lva's tokens per second for each number of streams, best of ROUNDS, the two measured in
    turn so that both see the same machine: this VM's speed drifts by several per cent over minutes."""
    stock: dict[int, float] = {}
    ours: dict[int, float] = {}
    for n in STREAMS:
        theirs = StockStreams(text, n, threads)
        try:
            mine = LvaStreams(model, images, n)
            try:
                for _ in range(ROUNDS):
                    stock[n] = max(stock.get(n, 0.0), theirs.rate(DECODE_TOKENS))
                    ours[n] = max(ours.get(n, 0.0), mine.rate(DECODE_TOKENS))
            finally:
                mine.close()
        finally:
            theirs.close()
        print(f"{n} streams: stock {stock[n]:.2f} tok/s, lva {ours[n]:.2f} tok/s", flush=True)
    return stock, ours


def product_scaling(threads: int) -> dict[str, dict[int, float]]:
    """Milliseconds of ggml's CPU product (llama.cpp's own kernels) for the text file's largest matrices, at
    1, 2 and 4 columns (tokens decoded together): Q4_K in llama.cpp's repacked layout, Q6_K as it stays.
    Random weights of the file's types and shapes, in copies that together outgrow the CPU's caches (as a
    model's weights do), the graph taking each in turn; best of 5 runs each."""
    backend = ggml.Backend(threads, ggml.cpu_device())
    scratch = ggml.Scratch(backend)
    rng = np.random.default_rng(0)
    found: dict[str, dict[int, float]] = {}
    try:
        for label, qtype, n_in, n_out, repack in PRODUCTS:
            copies = -(-UNCACHED_BYTES // (ggml.row_bytes(qtype, n_in) * n_out))
            weights = ggml.quantize_rows(rng.standard_normal((n_out, n_in), np.float32) * 0.02, qtype)
            with ggml.Memory(copies) as memory:
                ws = [memory.new(qtype, n_in, n_out, name=f"w{i}") for i in range(copies)]
                memory.allocate(backend, backend.repack_buffer_type() if repack else None)
                for w in ws:
                    ggml.tensor_set(w, weights)
                found[label] = {}
                for n in STREAMS:
                    g = ggml.Graph(4 * copies + 8)
                    try:
                        x = g.input(ggml.F32, n_in, n, name="x")
                        for w in ws:
                            g.expand(g.mul_mat(w, x))
                        columns = rng.standard_normal((n, n_in), np.float32)
                        times = []
                        for _ in range(6):                     # the first run places the graph
                            started = time.perf_counter()
                            scratch.run(g, {x: columns})
                            times.append(time.perf_counter() - started)
                        found[label][n] = 1000 * min(times[1:]) / copies
                    finally:
                        g.close()
    finally:
        scratch.close()
        backend.close()
    return found


def interleaved_rates(streams_of: dict[str, tuple[int, dict]], text: Path, threads: int) -> dict[str, float]:
    """Stock llama.cpp's tokens per second for each labelled (sequences, settings), all loaded at once and
    measured in turn, best of ROUNDS + 1: differences of a few per cent between settings are smaller than
    this VM's drift over minutes."""
    contexts: dict[str, StockStreams] = {}
    try:
        for label, (streams, settings) in streams_of.items():
            contexts[label] = StockStreams(text, streams, threads, **settings)
        rates: dict[str, float] = {}
        for _ in range(ROUNDS + 1):
            for label, context in contexts.items():
                rates[label] = max(rates.get(label, 0.0), context.rate(DECODE_TOKENS))
        return rates
    finally:
        for context in contexts.values():
            context.close()


def stock_settings(text: Path, threads: int) -> dict[str, dict[int, float]]:
    """Stock's 1- and 4-sequence rates under each of SETTINGS."""
    found: dict[str, dict[int, float]] = {label: {} for label, _ in SETTINGS}
    for n in (1, 4):
        rates = interleaved_rates({label: (n, settings) for label, settings in SETTINGS}, text, threads)
        for label, rate in rates.items():
            found[label][n] = rate
    print("settings:", found, flush=True)
    return found


def settings_lines(settings: dict[str, dict[int, float]]) -> list[str]:
    lines = ["", "Stock llama.cpp's other ways to decode several sequences, the same text file, each way's 1 and 4 "
             f"sequences loaded at once and measured in turn (best of {ROUNDS + 1}):", "",
             "| llama.cpp setting | 1 sequence tok/s | 4 sequences tok/s | 4 against 1 |", "|---|--:|--:|--:|"]
    lines += [f"| {label} | {rates[1]:.2f} | {rates[4]:.2f} | {rates[4] / rates[1]:.2f} × |"
              for label, rates in settings.items()]
    return lines


def scaling_lines(found: dict[str, dict[int, float]]) -> list[str]:
    lines = ["", "llama.cpp's own CPU products (`bench/parallel_bench.py`, `product_scaling`) on matrices of the text "
             "file's types and shapes, ms per product with N columns (the tokens of N streams), and the time for "
             "4 columns against 1:", "",
             "| matrix | " + " | ".join(f"{n} column{'s' if n > 1 else ''} ms" for n in STREAMS) + " | 4 against 1 |",
             "|---|" + "--:|" * (len(STREAMS) + 1)]
    for label, times in found.items():
        lines.append(f"| {label} | " + " | ".join(f"{times[n]:.2f}" for n in STREAMS) +
                     f" | {times[4] / times[1]:.2f} × |")
    return lines


def first_token_seconds(model, image: Path, busy: list[Path]) -> float:
    """Seconds from a request's arrival to its first token, while `busy` streams decode."""
    decoder = ParallelDecoder(model, len(busy) + 1, 1024)
    greedy = SamplingParams(temperature=0.0)
    try:
        others = [decoder.submit(Request(prompt(model, 40), other, greedy, max_tokens=10_000,
                                         stop_at_end_of_turn=False)) for other in busy]
        while not all(slot.last is not None for slot in decoder.slots[:len(busy)]):
            decoder.step()
        for _ in range(3):                                     # the others well into their answers
            decoder.step()
        started = time.perf_counter()
        newcomer = decoder.submit(Request(prompt(model, 100), image, greedy, max_tokens=4, stop_at_end_of_turn=False))
        while newcomer.events.empty():
            decoder.step()
        seconds = time.perf_counter() - started
        if not isinstance(newcomer.events.queue[0], int):
            raise RuntimeError(f"the newcomer did not answer: {newcomer.events.queue[0]}")
        for answer in [*others, newcomer]:
            answer.cancel()
        while decoder.step():
            pass
        return seconds
    finally:
        decoder.close()


def batch_runs(text: Path, images: list[Path], work: Path, threads: int, reuse: bool) -> dict[int, dict]:
    """`lva batch` as a user runs it, --parallel 1 and 4: wall seconds with the images encoded in the run,
    then with them in the feature cache; the answers by id and the tokens they hold (kept in `work`, and
    reused with --reuse)."""
    questions = work / "batch-questions.jsonl"
    questions.write_text("".join(json.dumps({"id": f"{i}-{j}", "prompt": question, "image": str(image)}) + "\n"
                                 for i, image in enumerate(images) for j, question in enumerate(BATCH_QUESTIONS)))
    kept = work / "batch-runs.json"
    if reuse and kept.exists():
        return {int(n): run for n, run in json.loads(kept.read_text()).items()}
    runs: dict[int, dict] = {}
    for parallel in (1, 4):
        home = work / f"batch-home-{parallel}"
        shutil.rmtree(home, ignore_errors=True)
        run: dict = {"walls": []}
        for _ in ("encoded in the run", "from the feature cache"):
            out = work / f"batch-{parallel}.jsonl"
            out.unlink(missing_ok=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "assistant", "batch", str(questions), "--out", str(out),
                            "--model", str(text), "--parallel", str(parallel), "--threads", str(threads),
                            "--temperature", "0", "--max-tokens", str(BATCH_TOKENS), "--ctx", "1024"],
                           env={**os.environ, "LVA_HOME": str(home)}, cwd=REPO, check=True, capture_output=True)
            run["walls"].append(time.perf_counter() - started)
            lines = [json.loads(line) for line in out.read_text().splitlines()]
            run["answers"] = {line["id"]: line["response"] for line in lines}
            run["tokens"] = sum(line["completion_tokens"] for line in lines)
        runs[parallel] = run
        print(f"lva batch --parallel {parallel}:", run["walls"], run["tokens"], "tokens", flush=True)
    kept.write_text(json.dumps(runs))
    return runs


def batch_lines(runs: dict[int, dict]) -> list[str]:
    one, four = runs[1], runs[4]
    same = one["answers"] == four["answers"]
    lines = ["", f"`lva batch`: 16 questions about 4 images (4 each), greedy, at most {BATCH_TOKENS} tokens each; wall "
             "times of the whole command (the model's load included).", "",
             "| `--parallel` | images encoded in the run s | images from the feature cache s | answer tokens |",
             "|--:|--:|--:|--:|"]
    lines += [f"| {n} | {run['walls'][0]:.1f} | {run['walls'][1]:.1f} | {run['tokens']} |" for n, run in runs.items()]
    lines += ["", f"`--parallel 4` against `--parallel 1`: {one['walls'][0] / four['walls'][0]:.2f} × as fast with the "
              f"encodes, {one['walls'][1] / four['walls'][1]:.2f} × with the images cached; the 16 answers are "
              f"{'the same' if same else '**not the same**'}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lva-first-answer"))
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    _, pair = prepare(args.work, FULL, args.threads, args.reuse)
    images = []
    for i in range(4):                                        # the memory cache keeps 4 images
        images.append(args.work / f"parallel-{i}.png")
        make_image(1100, 1100, 100 + i).save(images[-1])

    scaling = product_scaling(args.threads)
    print("products:", scaling, flush=True)
    settings = stock_settings(pair.text, args.threads)
    model = load_model(pair.text, n_ctx=1024, n_threads=args.threads)
    for image in images:
        model.encode_image(image)                              # every stream's image already encoded
    stock, ours = paired_rates(pair.text, model, images, args.threads)
    solo = first_token_seconds(model, images[3], [])
    among = first_token_seconds(model, images[3], images[:3])
    paths, lva_prompt = str(model.kernel_paths), len(prompt_of_length(model, PROMPT_TOKENS))
    model.close()
    batch = batch_runs(pair.text, images, args.work, args.threads, args.reuse)

    stock_speedup, our_speedup = stock[4] / stock[1], ours[4] / ours[1]
    share = SPEEDUP_SHARE * stock_speedup
    lines = [f"Measured {datetime.date.today().isoformat()} by `python bench/parallel_bench.py` on {machine()}, "
             f"{args.threads} threads; the synthetic 11B-width checkpoint ({FULL.describe()}), Q4_K_M; lva's "
             f"paths: {paths}. Each lva stream asks about a 4-tile image, encoded beforehand ({len(images)} images; with "
             f"more streams they repeat, never on neighbouring streams), in a {lva_prompt}-token prompt; stock "
             f"llama.cpp decodes the same text file, {PROMPT_TOKENS}-token prompts; {DECODE_TOKENS} decode steps "
             f"timed, the two measured in turn, best of {ROUNDS}.", "",
             "| streams | stock llama.cpp tok/s | × 1 stream | lva tok/s | × 1 stream |", "|--:|--:|--:|--:|--:|"]
    lines += [f"| {n} | {stock[n]:.2f} | {stock[n] / stock[1]:.2f} | {ours[n]:.2f} | {ours[n] / ours[1]:.2f} |"
              for n in STREAMS]
    lines += ["", "| target | required | measured | result |", "|---|---|---|---|",
              f"| 4-stream speed-up, against stock's | ≥ {SPEEDUP_SHARE} × {stock_speedup:.2f} = {share:.2f} | "
              f"{our_speedup:.2f} | {'PASS' if our_speedup >= share else '**MISS**'} |",
              f"| 4-stream speed-up, floor | ≥ {SPEEDUP_FLOOR:.2f} | {our_speedup:.2f} | "
              f"{'PASS' if our_speedup >= SPEEDUP_FLOOR else '**MISS**'} |",
              f"| first token of a request arriving among 3 streams | ≤ {NEWCOMER_SLACK} × {solo:.2f} s alone = "
              f"{NEWCOMER_SLACK * solo:.2f} s | {among:.2f} s | "
              f"{'PASS' if among <= NEWCOMER_SLACK * solo else '**MISS**'} |"]
    lines += scaling_lines(scaling)
    lines += settings_lines(settings)
    lines += batch_lines(batch)
    report = "\n".join(lines)
    print(report)
    if args.write_docs:
        write_section("parallel", report, HEADING)


if __name__ == "__main__":
    main()
