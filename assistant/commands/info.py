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
    if args.model:
        _show_placement(args)
    return 0


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
