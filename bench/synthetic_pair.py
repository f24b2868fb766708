"""The model the runtime benchmarks run: a synthetic checkpoint at the real Llama 3.2 11B Vision widths,
converted to Q4_K_M, and random images.

Shared by runtime_bench.py, chat_bench.py, first_answer_bench.py and device_bench.py, which put the
repository on sys.path first (the checkpoint writer lives in tests/, which is not installed).
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGUFReader
from PIL import Image

from convert.pipeline import convert, output_paths
from tests.synthetic_checkpoint import eleven_b_config, tensor_shapes, write_checkpoint

QUANT = "Q4_K_M"
SHARD_BYTES = 2 * 10**9
GB = 10**9


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


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """Random RGB pixels: encoding costs the same whatever the content."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")
