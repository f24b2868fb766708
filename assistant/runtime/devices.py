"""The devices this build of llama.cpp can run on, and the ones a model is offered.

A build has backends (CPU always; CUDA, Metal, Vulkan, RPC when compiled in), each with devices. ggml RPC
servers add the devices of another process or machine (models/rpc.py). This module answers `lva info`
and chooses the devices llama.cpp may offload a model to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import llama_cpp

from models import ggml, rpc


@dataclass(frozen=True)
class Build:
    """What llama-cpp-python was compiled with."""

    version: str
    backends: list[str]                  # ggml's registries: CPU, CUDA, Metal, Vulkan, RPC, ...
    features: dict[str, list[str]]       # per backend, what llama.cpp's system info lists (CPU: AVX2, ...)


def build() -> Build:
    """This process's llama-cpp-python: version, backends, features (before any RPC server is added)."""
    backends = [name for name in ggml.backend_registries() if "[" not in name]      # not the added RPC servers
    features: dict[str, list[str]] = {}
    section = "?"
    for item in llama_cpp.llama_print_system_info().decode().split("|"):
        item = item.strip()
        if " : " in item:
            section, item = (part.strip() for part in item.split(" : ", 1))
            features[section] = []
        if item:
            key, _, value = item.partition(" = ")
            features.setdefault(section, []).append(key if value == "1" else f"{key}={value}")
    return Build(llama_cpp.__version__, backends, features)


def offload_devices(rpc_servers: Sequence[str] = ()) -> list[ggml.Device]:
    """The devices llama.cpp may offload to, in its own default order: the given RPC servers' devices, then
    this machine's GPUs (one device per physical card; integrated GPUs only when there is no other).

    Passed to llama.cpp explicitly, so an RPC server added earlier in the process is used only when asked for.
    Raises rpc.RpcError for a server that cannot be used.
    """
    remote = [device for endpoint in rpc_servers for device in rpc.add_server(endpoint)]
    local = [d for d in ggml.devices() if d.backend != "RPC"]
    gpus: list[ggml.Device] = []
    for device in (d for d in local if d.kind == ggml.DEVICE_GPU):
        if device.device_id is None or device.device_id not in {g.device_id for g in gpus}:
            gpus.append(device)
    igpus = [d for d in local if d.kind == ggml.DEVICE_IGPU]
    return remote + (gpus or [d for d in igpus if d.backend == igpus[0].backend])

