"""One line at the bottom: the model, context used of available, tokens/s, the device it runs on."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static


class StatusBar(Static):
    model_name = reactive("no model")
    context_used = reactive(0)
    context_size = reactive(0)
    tokens_per_second = reactive(0.0)
    device = reactive("")           # e.g. CPU, CUDA0, "RPC0 20/32 layers + CPU 12/32 layers"

    def render(self) -> str:
        parts = [self.model_name]
        if self.context_size:
            parts.append(f"context {self.context_used}/{self.context_size}")
        if self.tokens_per_second:
            parts.append(f"{self.tokens_per_second:.1f} tok/s")
        if self.device:
            parts.append(self.device)
        return "  │  ".join(parts)
