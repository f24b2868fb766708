"""Device benchmark: what a device whose memory is not host memory costs per decoded token.

The cross-attention hook reads each `l_out` row it changes from the device and writes it back, and
feeds the cross-layer graph its input and reads its output: on the CPU these are memory copies, on a
GPU they cross PCIe, on ggml's RPC backend a socket. One run measures, per decoded token with a 1-tile
image bound, on the CPU and on one RPC server on 127.0.0.1 that lends this same CPU:

- decode time with the image and without it (llama.cpp's own cost of the device, against ours);
- the hook's time, and how many tensor gets and sets (crossings) it makes;
- what one crossing of a row costs on each (a set and a get of a hidden-size F32 row, timed apart
  from decoding: on a device the graphs run asynchronously, so inside the hook a get also waits for
  the compute before it, and timing the hook's own calls would mix the two);
- so, what crossing the device adds per decoded token: crossings × (device − CPU) per crossing.

`--on gpu` measures this machine's first GPU instead (a CUDA, Metal or Vulkan build; bench/gpu_check.sh).

The model is a synthetic checkpoint at the real Llama 3.2 11B widths with 8 self-attention and 8
cross-attention layers, one after each self layer, so the hook crosses the device at 8 points per
token as in 11B; its vision tower has one local and one global layer (only decoding is measured).
The RPC server computes with this machine's cores, which the client shares; what is specific to the
device is the crossing. Needs the RPC build (`make test-devices` makes `.venv-rpc`):

    .venv-rpc/bin/python bench/device_bench.py --work /tmp/lva-bench --reuse --write-docs
    .venv-cuda/bin/python bench/device_bench.py --on gpu --work /tmp/lva-bench   # a GPU build
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


from assistant import load_model  # noqa: E402
from assistant.runtime.devices import build, offload_devices  # noqa: E402
from models import ggml, rpc  # noqa: E402

from report import machine, write_section  # noqa: E402
from decode_timing import CallbackTimer, build_prompts  # noqa: E402
from synthetic_pair import Depth, make_image, prepare_pair  # noqa: E402

HEADING = "## Devices (GPUs; ggml's RPC backend as the test bed)"
INTRO = """\
lva's hook moves rows between llama.cpp's device and the host at every cross-attention layer of every
decoded token. `bench/device_bench.py` measures that on ggml's RPC backend against the CPU in the same run
(in the RPC build that `make test-devices` makes):

    .venv-rpc/bin/python bench/device_bench.py --work /tmp/lva-bench --reuse --write-docs"""
GPU_HEADING = "### On a GPU (`bench/device_bench.py --on gpu`, from `bench/gpu_check.sh`)"

DEPTH = Depth("devices", 16, tuple(range(1, 16, 2)), 1, 1)      # 8 self layers, a cross layer after each
N_CTX = 512
PROMPT_TOKENS = 64
IMAGE_SIZE = (500, 400)                                          # a 1-tile canvas


class Timer(CallbackTimer):
    """Takes the place of a function (of a module or an object): counts calls and the wall time inside."""

    def __init__(self, owner, name: str) -> None:
        super().__init__(getattr(owner, name))
        self.name = name
        setattr(owner, name, self)


@dataclass
class Timers:
    """The crossings the hook makes (directly, and setting a graph's input in Scratch.run) are counted
    process-wide; the runs never overlap, so one set serves both models. Each callback has its own timer."""

    crossings: list[Timer]
    callbacks: dict[str, CallbackTimer] = field(default_factory=dict)

    @classmethod
    def install(cls) -> Timers:
        return cls([Timer(ggml, name) for name in ("read_rows", "write_rows", "tensor_get", "tensor_set")])

    def watch(self, label: str, model) -> None:
        """Time a model's callback; before its llama.cpp context exists, which takes the callback then."""
        timer = CallbackTimer(model.hook.on_node)
        model.hook.route_callback(timer)
        self.callbacks[label] = timer

    def reset(self) -> None:
        for timer in (*self.crossings, *self.callbacks.values()):
            timer.reset()


@dataclass
class Step:
    """Per decoded token, in seconds (crossing: per set or get); best of the rounds for each figure."""

    decode_text: list[float] = field(default_factory=list)
    decode_image: list[float] = field(default_factory=list)
    hook: list[float] = field(default_factory=list)
    crossings_per_token: float = 0.0
    crossing: list[float] = field(default_factory=list)


def crossing_seconds(backend: ggml.Backend, width: int, repeats: int = 200) -> float:
    """Seconds per set or get of one F32 row of `width` in the backend's memory (pairs timed, halved)."""
    graph = ggml.Graph(2)
    row = graph.new(ggml.F32, width, name="row")
    buffer = backend.alloc(graph)
    data, back = np.random.default_rng(0).standard_normal(width, dtype=np.float32), np.empty(width, np.float32)
    try:
        started = time.perf_counter()
        for _ in range(repeats):
            ggml.write_rows(row, data)
            ggml.read_rows(row, back)
        return (time.perf_counter() - started) / (2 * repeats)
    finally:
        ggml.free_buffer(buffer)
        graph.close()


def main() -> int:
    args = parse_args()
    if args.on == "rpc":
        try:
            rpc.require()
        except rpc.RpcError as exc:
            raise SystemExit(f"device_bench needs the RPC build (make test-devices makes .venv-rpc): {exc}")
    elif not offload_devices():
        raise SystemExit("device_bench --on gpu: this llama-cpp-python sees no GPU (`lva info` lists its devices)")
    pair = prepare_pair(DEPTH, Path(args.work), args.threads, args.reuse)
    server = None
    if args.on == "rpc":
        server, endpoint = start_server(args.threads)
        device = ("RPC0 (127.0.0.1)", {"rpc_servers": [endpoint]})
    else:
        gpu = offload_devices()[0]
        device = (f"{gpu.name} ({gpu.description})", {})
    try:
        steps = measure(pair.text, device, args)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    report = render(steps, pair, args)
    print(report)
    if args.write_docs:
        if args.on == "rpc":
            write_section("device", report, f"{HEADING}\n\n{INTRO}")
        else:
            write_section("device-gpu", report, GPU_HEADING)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--on", choices=("rpc", "gpu"), default="rpc",
                        help="the device: a local ggml RPC server (default) or this machine's first GPU")
    parser.add_argument("--work", default="/tmp/lva-bench", metavar="DIR", help="where the converted pair goes")
    parser.add_argument("--reuse", action="store_true", help="use the pair already in --work")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads (default: all cores)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens per run (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best kept (default 3)")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the device section of docs/PERFORMANCE.md")
    return parser.parse_args()


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    """`lva rpc-server` lending this machine's CPU on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "assistant", "rpc-server", "--port", str(port), "--threads",
                               str(threads)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            rpc.hello("127.0.0.1", port, timeout=5)
            return server, f"127.0.0.1:{port}"
        except rpc.RpcError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("lva rpc-server did not start")


def measure(text: Path, device: tuple[str, dict], args: argparse.Namespace) -> dict[str, Step]:
    """Both placements loaded at once, their runs interleaved, so noise from other work falls on both alike."""
    places = {"CPU": {"n_gpu_layers": 0}, device[0]: device[1]}
    models = {label: load_model(text, n_ctx=N_CTX, n_threads=args.threads, **options)
              for label, options in places.items()}
    try:
        timers = Timers.install()
        for label, model in models.items():
            timers.watch(label, model)
        image = make_image(*IMAGE_SIZE, seed=0)
        steps = {label: Step() for label in models}
        for label, model in models.items():
            print(f"{label}: {model.placement.summary()}; encoding the image", flush=True)
            model.encode_image(image)
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}:", flush=True)
            for label, model in models.items():
                once(model, timers, label, steps[label], image, args.decode_tokens)
                steps[label].crossing.append(crossing_seconds(model.vision_backend, model.vision.hp.text.hidden_size))
                print(f"  {label}: {summary(steps[label])}", flush=True)
    finally:
        for model in models.values():
            model.close()
    return steps


def once(model, timers: Timers, label: str, step: Step, image, decode_tokens: int) -> None:
    image_ids, text_ids = build_prompts(model, PROMPT_TOKENS)
    step.decode_text.append(decode_seconds(model, text_ids, None, decode_tokens, lambda: None))
    step.decode_image.append(decode_seconds(model, image_ids, image, decode_tokens, timers.reset))
    tokens = decode_tokens + 1
    step.hook.append(timers.callbacks[label].seconds / tokens)
    step.crossings_per_token = sum(t.calls for t in timers.crossings) / tokens


def decode_seconds(model, ids: list[int], image, decode_tokens: int, after_prefill: Callable[[], None]) -> float:
    """Seconds per decoded token: the prompt evaluated from scratch, then `decode_tokens + 1` evaluations."""
    model.forget_context()
    tokens = model.generate_tokens(ids, image=image, max_tokens=decode_tokens + 1, temperature=0,
                                   stop_at_end_of_turn=False)
    next(tokens)
    after_prefill()
    started = time.perf_counter()
    steps = sum(1 for _ in tokens) + 1
    return (time.perf_counter() - started) / steps


def summary(step: Step) -> str:
    return (f"decode {1000 * step.decode_text[-1]:.1f} ms/token text only, {1000 * step.decode_image[-1]:.1f} with "
            f"the image; hook {1000 * step.hook[-1]:.2f} ms, {step.crossings_per_token:.0f} crossings of "
            f"{1e6 * step.crossing[-1]:.0f} µs")


def render(steps: dict[str, Step], pair, args: argparse.Namespace) -> str:
    (cpu_label, cpu), (device_label, device) = steps.items()
    ms = lambda values: 1000 * min(values)  # noqa: E731
    crossings = device.crossings_per_token
    each = {label: min(step.crossing) for label, step in steps.items()}
    added = crossings * (each[device_label] - each[cpu_label])
    rows = [("decode, text only, ms", ms(cpu.decode_text), ms(device.decode_text)),
            ("decode, 1-tile image bound, ms", ms(cpu.decode_image), ms(device.decode_image)),
            ("the hook (its cb_eval callback), ms", ms(cpu.hook), ms(device.hook)),
            ("one crossing (set or get of a row), µs", 1e6 * each[cpu_label], 1e6 * each[device_label]),
            (f"crossing, {crossings:.0f} per token, ms", 1000 * crossings * each[cpu_label],
             1000 * crossings * each[device_label])]
    table = [f"| per decoded token | {cpu_label} | {device_label} | difference |", "|---|--:|--:|--:|"]
    table += [f"| {label} | {a:.2f} | {b:.2f} | {b - a:+.2f} |" for label, a, b in rows]
    return (f"Measured {datetime.date.today().isoformat()} by `bench/device_bench.py` on {machine()}; llama-cpp-python "
            f"{version('llama-cpp-python')} (backends: {', '.join(build().backends)}); {args.threads} CPU threads; "
            f"best of {args.rounds} interleaved rounds of {args.decode_tokens} tokens. The machine is shared with "
            f"other work (and an RPC server shares its cores with the client), so the figures are noisy.\n\n"
            f"Model: {DEPTH.describe()} at 11B widths, {pair.text.stat().st_size / 2**30:.2f} GiB text + "
            f"{pair.vision.stat().st_size / 2**30:.2f} GiB vision file (Q4_K_M). On the device every text layer, "
            f"the cross layers and the image K/V live in its memory.\n\n" + "\n".join(table) + "\n\n"
            f"The hook makes {crossings:.0f} crossings per token: at each of the 8 cross-layer points it reads the "
            f"row, sets the graph's input, gets its output and writes the row back. Crossing the device adds about "
            f"{1000 * added:.1f} ms per decoded token here. The hook's own time on the device holds more than its "
            f"work: llama.cpp's graph up to each row runs asynchronously and finishes inside the hook's first get, "
            f"and each cross-layer graph is a round trip to the server, which computes with the same cores. The "
            f"decode rows are the totals: on the device llama.cpp's own decode costs "
            f"{ms(device.decode_text) - ms(cpu.decode_text):+.1f} ms per token (its graph and the logits cross "
            f"too), and with the image bound {ms(device.decode_image) - ms(cpu.decode_image):+.1f} ms.")


if __name__ == "__main__":
    sys.exit(main())
