"""Settings for the open conversation (and new ones): system prompt and sampling."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from assistant.chat.engine import Sampling


@dataclass
class Settings:
    system_prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)


class SettingsScreen(ModalScreen[Settings | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        sampling = self.settings.sampling
        with VerticalScroll(classes="dialog", id="settings"):
            yield Label("Settings", classes="dialog-title")
            yield Label("System prompt")
            yield TextArea(self.settings.system_prompt or "", id="system-prompt")
            for name, label, value in (("temperature", "Temperature (0 = greedy)", sampling.temperature),
                                       ("top_p", "Top-p", sampling.top_p),
                                       ("max_tokens", "Max tokens", sampling.max_tokens),
                                       ("seed", "Seed (empty: random)", sampling.seed)):
                with Horizontal(classes="setting"):
                    yield Label(label)
                    yield Input("" if value is None else str(value), id=name)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (Ctrl+S)", variant="primary", id="save")
                yield Button("Cancel (Esc)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()

    def action_save(self) -> None:
        def value(name: str) -> str:
            return self.query_one(f"#{name}", Input).value.strip()

        try:
            sampling = replace(self.settings.sampling, temperature=float(value("temperature")),
                               top_p=float(value("top_p")), max_tokens=int(value("max_tokens")),
                               seed=int(value("seed")) if value("seed") else None)
        except ValueError as error:
            self.notify(f"Not a number: {error}", severity="error")
            return
        system_prompt = self.query_one("#system-prompt", TextArea).text.strip() or None
        self.dismiss(Settings(system_prompt, sampling))

    def action_cancel(self) -> None:
        self.dismiss(None)
