"""`lva info`: which llama-cpp-python this is, what it was built with, the devices ggml sees, and with
--model, where each part of that model runs."""

from __future__ import annotations

import argparse

from assistant.commands import common

GIB = 2**30


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "info", help="show the llama.cpp build, the devices it sees, and where a model runs",
        description="Show llama-cpp-python's version and build (CPU features, GPU and RPC backends) and the devices "
                    "ggml sees. With --model, load the model and show the device of each part. A GPU build that "
                    "took lists its GPU under devices. Example: lva info --model llama-vision-11b --gpu-layers 20")
    parser.add_argument("--model", help="also load this model (name in the store or path to a text GGUF) "
                                        "and show where each part runs")
    parser.add_argument("--threads", type=int, help="CPU threads the kernels are measured with (default: all cores)")
    common.add_device_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    from assistant.runtime.devices import build, offload_devices
    from assistant.runtime.model import ModelError
    from models import ggml
    from models.rpc import RpcError

    this = build()
    print(f"lva {version('lva')}, llama-cpp-python {this.version}")
    print(f"backends: {', '.join(this.backends)}")
    for backend, features in this.features.items():
        print(f"  {backend}: {' '.join(features)}")
    servers = common.device_options(args)["rpc_servers"]
    try:
        offered = offload_devices(servers)
    except RpcError as exc:
        raise ModelError(str(exc)) from None
    print("devices:")
    for device in ggml.devices():
        free, total = device.memory()
        kind = "RPC server" if device.backend == "RPC" else ggml.DEVICE_KINDS.get(device.kind, "device")
        print(f"  {device.name:8} {kind:14} {device.description}  ({free / GIB:.1f} of {total / GIB:.1f} GiB free)")
    print(f"llama.cpp offloads to: {', '.join(d.name for d in offered) or 'nothing (CPU only)'}")
    _show_kernel_paths(args.threads)
    if args.model:
        _show_placement(args)
    return 0


def _show_kernel_paths(threads: int | None) -> None:
    """What lva's CPU kernels run on this machine, chosen by measuring them (once; kept in the cache)."""
    import os

    from assistant.runtime import kernel_choice
    from models.kernels import library
    from models.mllama.calibration import OPS, UNITS, fastest

    threads = threads or os.cpu_count() or 1
    if library.load()[0] is None:
        print(f"lva's CPU kernels: missing ({library.load()[1]}); ggml's own ops run instead")
        return
    found = kernel_choice.measurements(threads, progress=common.progress_line())
    chosen = kernel_choice.choose(threads)
    print(f"lva's CPU kernels, measured on this CPU with {threads} threads ({', '.join(map(str, library.isas()))}):")
    for op in OPS:
        print(f"  {op.replace('_', '-')}: {getattr(chosen, op)}"
              f"{' (forced by the environment)' if getattr(chosen, op) != fastest(found, op) else ''}")
        for m in sorted((m for m in found if m.op == op), key=lambda m: m.seconds):
            note = "" if m.within_bound else f"  (error {m.error:.1e} above its bound {m.bound:.0e}: never chosen)"
            print(f"    {str(m.path):18} {m.rate:8.1f} {UNITS[op]}{note}")


def _show_placement(args: argparse.Namespace) -> None:
    from assistant import load_model, store

    text = store.resolve_model(args.model)
    model = load_model(text, n_ctx=256, **common.device_options(args))
    try:
        layers = "all" if args.gpu_layers < 0 else args.gpu_layers
        print(f"{text.name} with --gpu-layers {layers}:")
        for line in model.placement.describe():
            print(f"  {line}")
    finally:
        model.close()
