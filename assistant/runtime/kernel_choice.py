"""The paths this machine's CPU runs, measured once and kept: models/mllama/calibration.py measures, this
module keeps the measurements in the cache folder, keyed by what they depend on (the CPU's vendor,
family, model and flags, the thread count, and the versions of lva, llama-cpp-python and the kernel
library), and applies what `LVA_ATTENTION`, `LVA_PRODUCTS` and `LVA_MLP_DOWN` force.

A cache file that cannot be read is ignored with a one-line warning and measured again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Callable, Mapping

import llama_cpp

from assistant.store import cache_dir
from models.kernels import library, paths
from models.kernels.paths import GGML_PATHS, KernelError, KernelPath, Paths
from models.mllama import calibration
from models.mllama.calibration import OPS, Measurement

log = logging.getLogger("lva")
CACHE_FILE = "kernel-paths.json"
MEASURING = "measuring the CPU's kernels"           # the progress stage
Progress = Callable[[str, float], None]


def cpu_identity() -> dict[str, str]:
    """What a measurement depends on in the CPU: vendor, family, model and flags (/proc/cpuinfo on Linux)."""
    fields = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "model name": "name",
              "flags": "flags"}
    identity = {"machine": platform.machine(), "processor": platform.processor()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in fields and fields[key.strip()] not in identity:
                identity[fields[key.strip()]] = value.strip()
    except OSError:
        pass
    return identity


def versions() -> dict[str, str]:
    """lva's, llama-cpp-python's, and the kernel library's content hash (a rebuild changes it)."""
    found = {"llama-cpp-python": llama_cpp.__version__}
    try:
        found["lva"] = metadata.version("lva")
    except metadata.PackageNotFoundError:
        found["lva"] = "unknown"
    origin = library.origin()
    found["kernels"] = hashlib.sha256(Path(origin).read_bytes()).hexdigest() if origin else "missing"
    return found


def cache_key(threads: int) -> dict:
    return {"cpu": cpu_identity(), "versions": versions(), "threads": threads}


def measurements(threads: int, progress: Progress | None = None, cache: Path | None = None) -> list[Measurement]:
    """This machine's measurements: from the cache when its key matches, else measured now (a few seconds,
    reported as the stage MEASURING) and kept."""
    cache = cache or cache_dir() / CACHE_FILE
    key = cache_key(threads)
    kept = _read(cache)
    if kept is not None and kept[0] == key:
        return kept[1]
    found = _measure(threads, progress)
    _write(cache, key, found)
    return found


def choose(threads: int, progress: Progress | None = None, environment: Mapping[str, str] = os.environ,
           cache: Path | None = None) -> Paths:
    """The path of each op on this CPU: the fastest within the bound, unless the environment forces one."""
    forced = {op: wanted for op, wanted in paths.forced(environment).items() if wanted is not None}
    if library.load()[0] is None:
        ggml_paths = (paths.GGML_FLASH_ATTENTION, paths.GGML_PRODUCTS, paths.GGML_BF16_PRODUCTS)
        if any(wanted not in ggml_paths for wanted in forced.values()):
            library.required()                                   # says why, in one line
        _warn_missing_library(library.load()[1])
        return replace(GGML_PATHS, **{op: wanted for op, wanted in forced.items() if isinstance(wanted, KernelPath)})
    found = measurements(threads, progress, cache)
    return replace(calibration.choose(found),
                   **{op: calibration.resolve_forced(wanted, op, found) for op, wanted in forced.items()})


def checked(wanted: Paths) -> Paths:
    """Paths a caller asks for, once this CPU is known to run each (a one-line KernelError otherwise)."""
    for op in OPS:
        path = getattr(wanted, op)
        if not library.runs(path, op):
            raise KernelError(f"this CPU cannot run {path} for the {op.replace('_', '-')}")
    return wanted


@functools.cache
def _warn_missing_library(why: str) -> None:
    log.warning(f"lva: its CPU kernels are missing: {why}; images are encoded, and answers about them decoded, "
                f"with ggml's slower ops. Reinstall lva where a C compiler is available to fix this.")


def _measure(threads: int, progress: Progress | None) -> list[Measurement]:
    planned = {op: calibration.candidates(op) for op in OPS}
    total, done = sum(len(p) for p in planned.values()), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(MEASURING, done / total)
    if progress:
        progress(MEASURING, 0.0)
    return [m for op, candidates in planned.items()
            for m in calibration.measure(op, candidates, threads, progress=step)]


def _read(cache: Path) -> tuple[dict, list[Measurement]] | None:
    try:
        data = json.loads(cache.read_text())
        return data["key"], [Measurement.from_json(m) for m in data["measurements"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning(f"lva: ignoring the unreadable kernel measurements in {cache} ({type(exc).__name__}); "
                    f"measuring again")
        return None


def _write(cache: Path, key: dict, found: list[Measurement]) -> None:
    """Best effort, whole or not at all: a cache that cannot be written only costs a measurement later."""
    data = json.dumps({"key": key, "measurements": [m.to_json() for m in found]}, indent=1)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, delete=False, suffix=".tmp") as f:
            f.write(data)
        os.replace(f.name, cache)
    except OSError as exc:
        log.warning(f"lva: could not keep the kernel measurements in {cache} ({exc})")

