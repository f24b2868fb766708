"""llama.cpp's log: kept quiet, read where lva needs what it says (where layers went, why memory ran out).

llama.cpp logs every tensor it loads on stderr; lva routes the log here, collects it while a block runs
(`collected`) and reports errors itself, in one line.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Iterator

import llama_cpp

LOG_ERROR = 4                                     # GGML_LOG_LEVEL_ERROR
_callback = None
_lines: list[tuple[int, str]] | None = None


def route() -> None:
    """Send llama.cpp's log here from now on (idempotent)."""
    global _callback
    if _callback is None:
        _callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def _on_log(level: int, text: bytes, _user_data) -> None:
    if _lines is not None:
        _lines.append((level, text.decode(errors="replace")))


@contextmanager
def collected() -> Iterator[list[tuple[int, str]]]:
    """(level, text) of what llama.cpp and ggml log while the block runs."""
    global _lines
    lines: list[tuple[int, str]] = []
    _lines = lines
    try:
        yield lines
    finally:
        _lines = None


def out_of_memory(lines: list[tuple[int, str]]) -> str | None:
    """llama.cpp's own words when an allocation failed, else None."""
    return next((text.strip() for level, text in lines if level == LOG_ERROR and "allocate" in text), None)
