"""lva: Llama 3.2 Vision on llama.cpp, offline, from the terminal.

The public API is the runtime: `load_model` (see DESIGN.md, "The runtime contract"). It is imported on
first use, so the command line starts fast and reports a wrong llama-cpp-python as a one-line error.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MllamaModel", "ModelError", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from assistant import runtime
        return getattr(runtime, name)
    raise AttributeError(f"module 'assistant' has no attribute {name!r}")
