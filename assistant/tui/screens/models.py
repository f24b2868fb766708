"""The installed models; choosing one loads it."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from assistant import store


class ModelsScreen(ModalScreen[Path | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: Path | None) -> None:
        super().__init__()
        self.current = current
        self.models = [m for m in store.installed_models() if m.text is not None]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="models"):
            yield Label("Models (Enter switches)", classes="dialog-title")
            options = []
            for model in self.models:
                mark = "● " if model.text == self.current else "  "
                kind = "text + vision" if model.vision else "text only"
                options.append(Option(f"{mark}{model.name}  {model.quant}  ({kind})", id=str(model.text)))
            yield OptionList(*options)
            if not self.models:
                yield Label(f"No models in {store.models_dir()}")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        assert event.option.id is not None          # every option is a model's text file
        self.dismiss(Path(event.option.id))

    def action_cancel(self) -> None:
        self.dismiss(None)
