"""The conversation as it is read: user messages, and the assistant's Markdown rendered as it streams."""

from __future__ import annotations

import time
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widget import Widget
from textual.widgets import Label, Markdown
from textual_image.widget import Image

RENDER_EVERY_SECONDS = 0.08       # re-parsing Markdown on every token would be the bottleneck


class UserMessage(Widget):
    def __init__(self, text: str, image: Path | None = None, image_name: str | None = None) -> None:
        super().__init__(classes="message user-message")
        self.text, self.image = text, image
        self.image_name = image_name or (image.name if image else None)

    def compose(self) -> ComposeResult:
        if self.image is not None:
            yield Image(self.image, classes="message-image")
            yield Label(f"🖼 {self.image_name}", classes="message-image-name")
        yield Markdown(self.text)


class AssistantMessage(Markdown):
    """Markdown that takes the answer's text as it grows, re-rendering at most every RENDER_EVERY_SECONDS."""

    def __init__(self, text: str = "", status: str = "complete") -> None:
        super().__init__(text, classes="message assistant-message")
        self.text = text
        self.status = status
        self._rendered_at = 0.0
        self.set_class(status == "stopped", "-stopped")

    def show(self, text: str, final: bool = False) -> None:
        self.text = text
        now = time.monotonic()
        if final or now - self._rendered_at >= RENDER_EVERY_SECONDS:
            self._rendered_at = now
            self.update(text)

    def finish(self, status: str) -> None:
        self.status = status
        self.set_class(status == "stopped", "-stopped")
        shown = self.text + ("\n\n*(stopped)*" if status == "stopped" else "")
        self.update(shown)


class ChatLog(VerticalScroll):
    """Scrolls to the end as messages arrive."""

    def clear(self) -> None:
        self.remove_children()

    def add_user(self, text: str, image: Path | None = None, image_name: str | None = None) -> UserMessage:
        message = UserMessage(text, image, image_name)
        self.mount(message)
        self.scroll_end(animate=False)
        return message

    def add_assistant(self, text: str = "", status: str = "complete") -> AssistantMessage:
        message = AssistantMessage(text, status)
        self.mount(message)
        self.scroll_end(animate=False)
        return message
