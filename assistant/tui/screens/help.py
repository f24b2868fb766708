"""Every key, gathered from the bindings themselves so the list cannot go stale."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

INPUT_KEYS = [("enter", "Send the message"), ("shift+enter, ctrl+j", "New line"),
              ("up", "Recall the last message (cursor at the start)"),
              ("paste / drop a file", "Attach the image at that path"),
              ("/image PATH", "Attach an image (typed in the box)"),
              ("r (first run)", "Look for an installed model again")]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, bindings: list[Binding]) -> None:
        super().__init__()
        self.bindings = bindings

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="help"):
            yield Label("Keys (Esc closes; Ctrl+P opens the command palette)", classes="dialog-title")
            yield DataTable(id="help-keys", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("Key", "What it does")
        for binding in self.bindings:
            table.add_row(binding.key, binding.description)
        for key, description in INPUT_KEYS:
            table.add_row(key, description)
