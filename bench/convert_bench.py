"""Converter benchmark: `lva convert` on synthetic checkpoints at real 11B widths, at two depths.

The converter promises to stream tensor by tensor from memory-mapped safetensors, so its peak memory
must not grow with model size. Two checkpoints that differ only in depth show this: every width
(4096 hidden, 14336 ffn, 128256 vocab, 1280-wide vision encoder) is the real 11B one, so the largest
tensors, and with them the working set, are the real ones; only the number of layers changes.

Each conversion is the real command line in a child process, measured on its own:

    python bench/convert_bench.py                 # every quant type, prints the tables
    python bench/convert_bench.py --write-docs    # and rewrites the section of docs/PERFORMANCE.md
    python bench/convert_bench.py --quants Q4_K_M BF16 --work /data/bench
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the synthetic checkpoint writer lives in tests/, which is not installed

from convert.pipeline import output_paths  # noqa: E402
from convert.quant_types import QUANT_TYPES  # noqa: E402
from tests.synthetic_checkpoint import eleven_b_config, write_checkpoint  # noqa: E402

from report import DOCS, machine, write_section  # noqa: E402

SHARD_BYTES = 2 * 10**9          # published checkpoints come in shards of a few GB
POLL_SECONDS = 0.1               # how often the child's anonymous memory is sampled
MB, GB = 10**6, 10**9


@dataclass(frozen=True)
class Depth:
    """How many layers a synthetic checkpoint has; every width is the real 11B one."""

    name: str
    text_layers: int             # including the cross-attention layers, as in config.json
    cross_layers: tuple[int, ...]
    vision_layers: int           # the local encoder layers
    global_layers: int

    def config(self) -> dict:
        return eleven_b_config(self.text_layers, list(self.cross_layers), self.vision_layers, self.global_layers)

    def describe(self) -> str:
        return (f"{self.text_layers} text layers ({len(self.cross_layers)} of them cross-attention), "
                f"{self.vision_layers} local + {self.global_layers} global vision layers")


# The 11B model has 40 text layers (8 cross-attention) and 32 local + 8 global vision layers; these
# depths are what the 2-core, 24 GiB development machine's disk and time allow.
DEPTHS = (Depth("shallow", 4, (3,), 2, 1), Depth("deep", 8, (3, 7), 4, 2))


@dataclass(frozen=True)
class Run:
    """One `lva convert` of one checkpoint to one quant type."""

    quant: str
    exit_code: int
    seconds: float
    peak_rss_kib: int            # the child's own ru_maxrss: anonymous memory plus mapped file pages
    peak_anon_kib: int           # the child's RssAnon, sampled: what it allocated, without file pages
    text_bytes: int
    vision_bytes: int
    error: str = ""


@dataclass(frozen=True)
class DepthResult:
    depth: Depth
    checkpoint_bytes: int
    build_seconds: float
    runs: list[Run]


def main() -> int:
    args = parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lva-convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = [bench_depth(depth, work, args.quants, args.threads) for depth in DEPTHS]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report = render_report(results, args.threads)
    print(report)
    if args.write_docs:
        write_section("convert", report)
        print(f"wrote the converter section of {DOCS.relative_to(REPO)}")
    return 1 if any(run.exit_code for result in results for run in result.runs) else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quants", nargs="+", default=list(QUANT_TYPES), choices=list(QUANT_TYPES), metavar="Q",
                        help=f"quant types to convert to (default: all of {', '.join(QUANT_TYPES)})")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="quantizer threads passed to lva convert (default: all cores)")
    parser.add_argument("--work", metavar="DIR",
                        help="where checkpoints and outputs go (default: a temporary directory, removed after)")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"rewrite the converter section of {DOCS.relative_to(REPO)} with the results")
    return parser.parse_args()


def bench_depth(depth: Depth, work: Path, quants: list[str], threads: int) -> DepthResult:
    """Build one checkpoint, convert it to every quant, and delete it all: disk holds one depth at a time."""
    source = work / f"synthetic-11b-{depth.name}"
    print(f"building the {depth.name} checkpoint ({depth.describe()}) in {source}", flush=True)
    started = time.perf_counter()
    build_checkpoint(source, depth)
    build_seconds = time.perf_counter() - started
    checkpoint_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    try:
        runs = [convert_once(source, work / f"out-{depth.name}-{quant}", quant, threads) for quant in quants]
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return DepthResult(depth, checkpoint_bytes, build_seconds, runs)


def build_checkpoint(source: Path, depth: Depth) -> None:
    """Write the checkpoint from a forked process, so that this one's peak memory stays small.

    Writing the 2 GB embedding takes about 6 GB, and Linux carries a process's peak RSS over fork and
    exec into its child's ru_maxrss: built here, it would put a 6 GB floor under every measurement.
    """
    builder = multiprocessing.get_context("fork").Process(
        target=write_checkpoint, args=(source, depth.config()), kwargs={"seed": 0, "shard_bytes": SHARD_BYTES})
    builder.start()
    builder.join()
    if builder.exitcode:
        raise RuntimeError(f"building the {depth.name} checkpoint failed (exit {builder.exitcode})")


def convert_once(source: Path, out: Path, quant: str, threads: int) -> Run:
    """Run the real command line, measure it, note the output sizes, then delete the outputs."""
    command = [sys.executable, "-m", "assistant", "convert", str(source), "--out", str(out), "--quant", quant,
               "--force", "--threads", str(threads)]
    print(f"  {quant}: {' '.join(command[1:])}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    try:
        with open(log, "w+b") as streams:
            exit_code, seconds, peak_rss, peak_anon = run_measured(command, streams)
            streams.seek(0)
            output = streams.read().decode(errors="replace")
        paths = output_paths(out, source.name, quant)
        sizes = [p.stat().st_size if p.exists() else 0 for p in (paths.text, paths.vision)]
        leftovers = sorted(p.name for p in out.iterdir() if p not in (paths.text, paths.vision))
        error = _last_line(output) if exit_code else ""
        if leftovers:
            error = f"{error} left behind: {', '.join(leftovers)}".strip()
        run = Run(quant, exit_code, seconds, peak_rss, peak_anon, sizes[0], sizes[1], error)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        log.unlink(missing_ok=True)
    print(f"    {seconds:.1f} s, peak RSS {peak_rss / 1024:.0f} MiB, exit {exit_code} {run.error}", flush=True)
    return run


def run_measured(command: list[str], streams: BinaryIO) -> tuple[int, float, int, int]:
    """(exit code, wall seconds, peak RSS KiB, peak anonymous KiB) of `command` alone.

    os.wait4 gives this child's own rusage; RUSAGE_CHILDREN would fold in every child reaped so far,
    so after the first large run every later figure would read as that run's peak. Waiting without
    blocking lets the loop sample RssAnon meanwhile: ru_maxrss also counts file pages the child has
    mapped (llama.cpp's quantizer maps its whole input), which the kernel can drop at will.
    """
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=streams, stderr=subprocess.STDOUT, cwd=REPO)
    peak_anon = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        peak_anon = max(peak_anon, _rss_anon_kib(child.pid))
        time.sleep(POLL_SECONDS)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return child.returncode, seconds, usage.ru_maxrss, peak_anon


def _rss_anon_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:                                    # exited between wait4 and the read
        return 0
    return 0


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def render_report(results: list[DepthResult], threads: int) -> str:
    """The converter section, in Markdown (which also reads fine in a terminal)."""
    parts = [render_setup(results, threads)]
    parts += [render_depth(result) for result in results]
    if len(results) == 2:
        parts.append(render_rss_comparison(*results))
    return "\n\n".join(parts)


def render_setup(results: list[DepthResult], threads: int) -> str:
    depths = "\n".join(f"- **{r.depth.name}**: {r.depth.describe()}; {r.checkpoint_bytes / GB:.2f} GB of bf16 "
                       f"safetensors in {SHARD_BYTES // GB} GB shards" for r in results)
    return (f"Measured {datetime.date.today().isoformat()} by `python bench/convert_bench.py --write-docs` "
            f"on {machine()}; "
            f"llama-cpp-python {version('llama-cpp-python')}, gguf {version('gguf')}, "
            f"Python {platform.python_version()}, `--threads {threads}`.\n\n"
            f"Synthetic random checkpoints at the real Llama 3.2 11B Vision widths (4096 hidden, 14336 ffn, "
            f"128256 vocabulary, 1280-wide vision encoder), at two depths:\n\n{depths}\n\n"
            f"The real model has 40 text layers (8 cross-attention) and 32 local + 8 global vision layers; "
            f"the depth is reduced because of this machine's disk and time. Each row is one "
            f"`python -m assistant convert SRC --out OUT --quant Q --force --threads {threads}` in a child "
            f"process, timed on the wall clock, its peak RSS from `os.wait4` (that child only; Linux "
            f"starts it from the spawning process's peak, which was {_own_peak_mib():.0f} MiB, below every "
            f"figure). "
            f"*Peak anon* is the child's RssAnon sampled every {POLL_SECONDS} s: its own allocations, "
            f"without the file pages it has memory-mapped. MB/s is checkpoint bytes / seconds. The checkpoint "
            f"was written just before, so it is read from the page cache, not the disk.")


def render_depth(result: DepthResult) -> str:
    header = (f"**{result.depth.name}** checkpoint: {result.checkpoint_bytes / GB:.2f} GB "
              f"(built in {result.build_seconds:.0f} s)\n\n"
              "| quant | seconds | MB/s | peak RSS MiB | peak anon MiB | text GGUF GB | vision GGUF GB "
              "| total % of checkpoint |\n|---|--:|--:|--:|--:|--:|--:|--:|")
    rows = [_run_row(run, result.checkpoint_bytes) for run in result.runs]
    return "\n".join([header, *rows])


def _run_row(run: Run, checkpoint_bytes: int) -> str:
    if run.exit_code:
        return f"| {run.quant} | failed (exit {run.exit_code}) after {run.seconds:.0f} s: {run.error} ||||||"
    total = run.text_bytes + run.vision_bytes
    note = f" ({run.error})" if run.error else ""
    return (f"| {run.quant}{note} | {run.seconds:.1f} | {checkpoint_bytes / MB / run.seconds:.0f} "
            f"| {run.peak_rss_kib / 1024:.0f} | {run.peak_anon_kib / 1024:.0f} | {run.text_bytes / GB:.2f} "
            f"| {run.vision_bytes / GB:.2f} | {100 * total / checkpoint_bytes:.0f} % |")


def render_rss_comparison(shallow: DepthResult, deep: DepthResult) -> str:
    """Deep over shallow, per quant: about 1.0 when memory does not grow with model size."""
    size_ratio = deep.checkpoint_bytes / shallow.checkpoint_bytes
    lines = [f"Peak memory, {deep.depth.name} vs {shallow.depth.name} (the checkpoint is {size_ratio:.2f}× "
             f"as large; a ratio near 1.00 means memory does not grow with model size):\n",
             "| quant | peak RSS MiB | ratio | peak anon MiB | ratio |", "|---|--:|--:|--:|--:|"]
    for a, b in zip(shallow.runs, deep.runs):
        lines.append(f"| {a.quant} | {a.peak_rss_kib / 1024:.0f} → {b.peak_rss_kib / 1024:.0f} "
                     f"| {_ratio(b.peak_rss_kib, a.peak_rss_kib)} | {a.peak_anon_kib / 1024:.0f} → "
                     f"{b.peak_anon_kib / 1024:.0f} | {_ratio(b.peak_anon_kib, a.peak_anon_kib)} |")
    return "\n".join(lines)


def _ratio(numerator: int, denominator: int) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "n/a"


def _own_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    raise SystemExit(main())
