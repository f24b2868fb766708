"""What the benchmark scripts share: the machine they ran on, and their sections of docs/PERFORMANCE.md.

Each script owns the text between its two markers (`<!-- NAME-bench:start -->` ... `:end -->`) and
rewrites only that, so hand-written analysis around the sections survives a rerun.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from models.atomic_write import write_atomically

DOCS = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


def cpu_model() -> str:
    """The model name with the vendor, family and model numbers (one model name covers several generations)."""
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():
            break
    if "model name" not in fields:
        return platform.processor() or "unknown CPU"
    vendor, family, model = (fields.get(key, "?") for key in ("vendor_id", "cpu family", "model"))
    return f"{fields['model name']}, {vendor} family {family} model {model}"


# The instruction sets that decide which kernels run: ggml's and ours, and torch's.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
                "amx_bf16", "amx_tile")


def cpu_flags() -> str:
    """This CPU's flags among KERNEL_FLAGS, as /proc/cpuinfo names them: every figure is written next to them."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return " ".join(flag for flag in KERNEL_FLAGS if flag in flags) or "none of " + " ".join(KERNEL_FLAGS)
    return "unknown"


def machine() -> str:
    """One line for a report: cores, CPU model and flags, memory, OS."""
    return (f"{os.cpu_count()} cores ({cpu_model()}; flags: {cpu_flags()}), {ram_gib():.0f} GiB RAM, "
            f"{platform.system()}")


def emulation_note() -> list[str]:
    """A paragraph (and a blank line) when a run stands in for a smaller CPU: ggml built without AVX-512 on an
    AVX-512 CPU, with our kernel and torch held to AVX2 by the environment variables named."""
    from models import ggml

    if "avx512f" not in cpu_flags().split() or ggml.cpu_features().get("AVX512") == "1":
        return []
    limits = ", ".join(f"{k}={os.environ[k]}" for k in ("LVA_ATTENTION", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                        "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS")
                       if k in os.environ)
    return [f"**As an AVX2-only CPU would run it**, on this AVX-512 machine: llama-cpp-python built with AVX2, FMA "
            f"and F16C but no AVX-512 (ggml's features: {', '.join(ggml.cpu_features())}), and "
            f"{limits or 'no limits'}. "
            f"The cores, caches and clock are this machine's, so this stands in for, but is not, an AVX2-only CPU.",
            ""]


def ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / 2**30
    return 0.0


def write_section(name: str, report: str, preamble: str = "") -> None:
    """Put `report` between the `name` markers; the first time, append `preamble` (heading, intro) and them."""
    start, end = f"<!-- {name}-bench:start -->", f"<!-- {name}-bench:end -->"
    text = DOCS.read_text() if DOCS.exists() else "# Performance\n"
    section = f"{start}\n{report}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"{preamble}\n\n" if preamble else "") + section + "\n"
    with write_atomically(DOCS, "w") as out:
        out.write(text)
