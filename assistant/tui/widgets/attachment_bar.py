"""The image waiting to go with the next message: a preview, its name and size, and a way to remove it."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Button, Label
from textual_image.widget import Image


def describe_image(path: Path, width: int, height: int) -> str:
    size = path.stat().st_size
    kind = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"
    return f"{path.name}  {width}×{height}  {kind}"


class AttachmentBar(Horizontal):
    """Hidden while nothing is attached."""

    path: reactive[Path | None] = reactive(None, recompose=True)

    class Removed(Message):
        """The remove button was pressed."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.description = ""

    def attach(self, path: Path | None, description: str = "") -> None:
        self.description = description
        self.path = path
        self.set_class(path is not None, "-attached")

    def compose(self) -> ComposeResult:
        if self.path is None:
            return
        yield Image(self.path, id="attachment-preview")
        with Vertical(id="attachment-details"):
            yield Label(self.description, id="attachment-name")
            yield Button("Remove (F4)", id="attachment-remove", variant="warning")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.Removed())
