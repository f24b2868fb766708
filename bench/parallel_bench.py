"""Several answers at once: lva's aggregate decode rate with 1, 2 and 4 streams beside stock llama.cpp's
batched decode of the same text file, and how long a request arriving among 3 decoding streams waits.

On the synthetic 11B-width Q4_K_M checkpoint of the first-answer bench (10 text layers, 2 of them
cross-attention, the full vision tower), each stream about its own 4-tile image, already encoded (so
only decoding is timed). In one run, on one machine, 2 threads (the default):

- stock llama.cpp (llama-cpp-python, no lva): the text file, one context with N sequences in a unified KV
  cache, each sequence a 64-token prompt, then 64 steps that decode one token of every sequence;
- lva (`ParallelDecoder`): N requests with their images, greedy; the steps where every stream decodes
  (no prompt rows) are timed;
- a request arriving while 3 streams decode: its time to first token, against the same request alone;
- `lva batch` on 16 questions about 4 images (4 each), `--parallel 1` and `--parallel 4`: wall times with
  the images encoded in the run (a fresh LVA_HOME), then again with them found in that home's feature cache
  (the decode phase, the model's load included), and whether both write the same answers.

Targets (the parallel-answers issue): lva's 4-stream speed-up over one stream at least 0.9 x stock's
4-sequence speed-up, and at least 2x; the newcomer's first token within its solo time + 25 %.

    python bench/parallel_bench.py --work /tmp/lva-first-answer --reuse              # about 20 minutes
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from assistant import load_model  # noqa: E402
from assistant.runtime.sampling import SamplingParams  # noqa: E402
from assistant.runtime.parallel import ParallelDecoder, Request  # noqa: E402
from first_answer_bench import prepare  # noqa: E402
from report import machine, write_section  # noqa: E402
from synthetic_pair import FULL, make_image  # noqa: E402

STREAMS = (1, 2, 4)
PROMPT_TOKENS, DECODE_TOKENS = 64, 64
SPEEDUP_SHARE, SPEEDUP_FLOOR, NEWCOMER_SLACK = 0.9, 2.0, 1.25
BATCH_QUESTIONS = ("What is in this picture?", "Describe its colours.", "What stands out in it?", "Write a caption.")
BATCH_TOKENS = 32
HEADING = "## Several answers at once (`lva serve --parallel`, `lva batch --parallel`)"


def stock_rate(text: Path, streams: int, threads: int) -> float:
    """Tokens per second of llama.cpp alone decoding `streams` sequences one step at a time."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(text).encode(), params)
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx, context_params.n_seq_max, context_params.kv_unified = 256 * streams, streams, True
    context_params.n_batch = context_params.n_ubatch = 256
    context_params.n_threads = context_params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, context_params)
    batch = llama_cpp.llama_batch_init(PROMPT_TOKENS * streams, 0, 1)
    rng = np.random.default_rng(0)

    def decode(rows: list[tuple[int, int, int]]) -> None:     # (token, position, sequence)
        for i, (token, position, sequence) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, True
        batch.n_tokens = len(rows)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
    try:
        decode([(int(rng.integers(1000, 100000)), p, s) for s in range(streams) for p in range(PROMPT_TOKENS)])
        started = time.perf_counter()
        for step in range(DECODE_TOKENS):
            decode([(int(rng.integers(1000, 100000)), PROMPT_TOKENS + step, s) for s in range(streams)])
        return streams * DECODE_TOKENS / (time.perf_counter() - started)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def prompt(model, words: int) -> list[int]:
    text = " ".join(["describe"] * words)
    return model.tokenize("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>" + text +
                          "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def lva_rate(model, images: list[Path], streams: int) -> float:
    """Tokens per second of lva decoding `streams` answers about their own images, over the steps where
    every stream decodes."""
    decoder = ParallelDecoder(model, streams, 1024)
    greedy = SamplingParams(temperature=0.0)
    try:
        answers = [decoder.submit(Request(prompt(model, 40), images[i], greedy, max_tokens=DECODE_TOKENS + 8,
                                          stop_at_end_of_turn=False)) for i in range(streams)]
        while not all(slot.last is not None for slot in decoder.slots):      # prompts in, first tokens out
            decoder.step()
        started, steps = time.perf_counter(), 0
        while steps < DECODE_TOKENS:
            decoder.step()
            steps += 1
        rate = streams * steps / (time.perf_counter() - started)
        for answer in answers:
            answer.cancel()
        while decoder.step():
            pass
        return rate
    finally:
        decoder.close()


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

    stock = {n: stock_rate(pair.text, n, args.threads) for n in STREAMS}
    print("stock:", stock, flush=True)
    model = load_model(pair.text, n_ctx=1024, n_threads=args.threads)
    for image in images:
        model.encode_image(image)                              # every stream's image already encoded
    ours = {n: lva_rate(model, images, n) for n in STREAMS}
    print("lva:", ours, flush=True)
    solo = first_token_seconds(model, images[3], [])
    among = first_token_seconds(model, images[3], images[:3])
    paths = str(model.kernel_paths)
    model.close()
    batch = batch_runs(pair.text, images, args.work, args.threads, args.reuse)

    stock_speedup, our_speedup = stock[4] / stock[1], ours[4] / ours[1]
    required = max(SPEEDUP_SHARE * stock_speedup, SPEEDUP_FLOOR)
    lines = [f"Measured {datetime.date.today().isoformat()} by `python bench/parallel_bench.py` on {machine()}, "
             f"{args.threads} threads; the synthetic 11B-width checkpoint ({FULL.describe()}), Q4_K_M; lva's "
             f"paths: {paths}. Each lva stream asks about its own 4-tile image, encoded beforehand; stock llama.cpp "
             f"decodes the same text file, {PROMPT_TOKENS}-token prompts; {DECODE_TOKENS} decode steps timed.", "",
             "| streams | stock llama.cpp tok/s | × 1 stream | lva tok/s | × 1 stream |", "|--:|--:|--:|--:|--:|"]
    lines += [f"| {n} | {stock[n]:.2f} | {stock[n] / stock[1]:.2f} | {ours[n]:.2f} | {ours[n] / ours[1]:.2f} |"
              for n in STREAMS]
    lines += ["", "| target | required | measured | result |", "|---|---|---|---|",
              f"| 4-stream speed-up | ≥ max({SPEEDUP_SHARE} × {stock_speedup:.2f}, {SPEEDUP_FLOOR}) = {required:.2f} | "
              f"{our_speedup:.2f} | {'PASS' if our_speedup >= required else '**MISS**'} |",
              f"| first token of a request arriving among 3 streams | ≤ {NEWCOMER_SLACK} × {solo:.2f} s alone = "
              f"{NEWCOMER_SLACK * solo:.2f} s | {among:.2f} s | "
              f"{'PASS' if among <= NEWCOMER_SLACK * solo else '**MISS**'} |"]
    lines += batch_lines(batch)
    report = "\n".join(lines)
    print(report)
    if args.write_docs:
        write_section("parallel", report, HEADING)


if __name__ == "__main__":
    main()
