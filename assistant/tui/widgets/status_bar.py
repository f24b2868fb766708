"""One line at the bottom: the model, context used of available, tokens/s, the backend."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static


class StatusBar(Static):
    model_name = reactive("no model")
    context_used = reactive(0)
    context_size = reactive(0)
    tokens_per_second = reactive(0.0)
    backend = reactive("")

    def render(self) -> str:
        parts = [self.model_name]
        if self.context_size:
            parts.append(f"context {self.context_used}/{self.context_size}")
        if self.tokens_per_second:
            parts.append(f"{self.tokens_per_second:.1f} tok/s")
        if self.backend:
            parts.append(self.backend)
        return "  │  ".join(parts)
