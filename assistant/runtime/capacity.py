"""How many sequences of a context length fit this machine's memory, said before anything is loaded.

The KV cache holds, for every token of every sequence, K and V of every self-attention layer:
layers x 2 x kv_heads x head_dim values (128 KiB per token for 11B with llama.cpp's F16 cache). Beside it
the model's files (memory-mapped, read whole while answering) and llama.cpp's compute buffers.
"""

from __future__ import annotations

import os
from pathlib import Path

from assistant.runtime.errors import ModelError
from models.gguf_header import HeaderError, read_header

DEFAULT_PARALLEL = 4
COMPUTE_BYTES = 2**30                 # llama.cpp's compute buffers and the vision tower's, about
GIB = 2**30


def kv_bytes_per_token(text_gguf: Path, bytes_per_value: int = 2) -> int:
    """K and V of every layer for one token, read from the text file's header."""
    try:
        metadata = read_header(text_gguf).metadata
    except HeaderError as exc:
        raise ModelError(str(exc)) from None

    def value(key: str) -> int:
        found = metadata.get(f"llama.{key}")
        if not isinstance(found, int):
            raise ModelError(f"{text_gguf.name} does not say its {key} (not a llama text file?)")
        return found
    head_dim = value("embedding_length") // value("attention.head_count")
    return value("block_count") * 2 * value("attention.head_count_kv") * head_dim * bytes_per_value


def available_bytes() -> int | None:
    """Memory the system can give now (Linux's MemAvailable), or None where it cannot say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def sequences_that_fit(files: list[Path], n_ctx: int, wanted: int | None, bytes_per_value: int = 2) -> int:
    """`wanted` (at least 1, checked by the caller) sequences of `n_ctx` tokens when they fit, else a one-line
    ModelError; without `wanted`, the most up to DEFAULT_PARALLEL that fit (at least one: a model that does not
    fit at all says so when it loads)."""
    per_sequence = kv_bytes_per_token(files[0], bytes_per_value) * n_ctx
    available = available_bytes()
    if available is None:
        return wanted or DEFAULT_PARALLEL
    room = available - sum(f.stat().st_size for f in files if f.exists()) - COMPUTE_BYTES
    fitting = max(0, room // per_sequence)
    if wanted is None:
        return max(1, min(DEFAULT_PARALLEL, fitting))
    if wanted > fitting:
        raise ModelError(f"{wanted} sequences of {n_ctx} tokens need {wanted * per_sequence / GIB:.1f} GiB of KV cache "
                         f"beside the model; {max(room, 0) / GIB:.1f} GiB is free, enough for {fitting}: lower "
                         f"--parallel or --ctx")
    return wanted
