"""The message box: Enter sends, Shift+Enter / Ctrl+J add a line, Up recalls, a pasted image path attaches."""

from __future__ import annotations

import shlex
from pathlib import Path
from urllib.parse import unquote, urlparse

from textual import events
from textual.message import Message
from textual.widgets import TextArea

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


def image_path_from_paste(text: str) -> Path | None:
    """The image a pasted text names, or None when it is ordinary text.

    Dropping a file on a terminal pastes its path: plain, quoted, with backslash-escaped spaces, or as a
    file:// URI. The file need not exist (the caller reports that); it must look like an image or be a file.
    """
    text = text.strip()
    if not text or "\n" in text:
        return None
    if text.startswith("file://"):
        candidate = unquote(urlparse(text).path)
    else:
        try:
            parts = shlex.split(text)
        except ValueError:
            return None
        candidate = parts[0] if len(parts) == 1 else text
    path = Path(candidate).expanduser()
    if path.suffix.lower() in IMAGE_SUFFIXES or (path.is_file() and path.is_absolute()):
        return path
    return None


class PromptInput(TextArea):
    """A TextArea whose Enter sends; the app's input box."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class ImagePasted(Message):
        def __init__(self, path: Path) -> None:
            super().__init__()
            self.path = path

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, **kwargs)
        self.sent: list[str] = []                 # earlier prompts, for Up
        self._recalled = 0

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.sent.append(text)
            self._recalled = 0
            self.post_message(self.Submitted(text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if event.key == "up" and self.cursor_location[0] == 0 and self.sent:
            if self._recalled < len(self.sent):
                self._recalled += 1
            event.stop()
            event.prevent_default()
            self.text = self.sent[-self._recalled]
            self.move_cursor((0, 0))
            return
        await super()._on_key(event)

    async def _on_paste(self, event: events.Paste) -> None:
        path = image_path_from_paste(event.text)
        if path is None:
            await super()._on_paste(event)
            return
        event.stop()
        event.prevent_default()
        self.post_message(self.ImagePasted(path))
