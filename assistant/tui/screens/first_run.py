"""Shown when no model is installed: how to get one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Markdown

from assistant import store

if TYPE_CHECKING:
    from assistant.tui.app import LvaApp

HOW_TO = """\
# No model yet

lva runs Llama 3.2 Vision on your machine, offline. Get a model once. The quickest way downloads
Ollama's ready Q4_K_M (about 8 GB, no account needed):

```
lva pull llama3.2-vision
```

If Ollama already downloaded it, `lva import llama3.2-vision` uses that copy instead. Or convert
Meta's checkpoint from Hugging Face (accept Meta's licence there first), in any quantization:

```
lva convert meta-llama/Llama-3.2-11B-Vision-Instruct
```

It goes into `{models}`. Then press **r** to look again, or **q** to quit.
"""


class FirstRunScreen(Screen):
    BINDINGS = [Binding("r", "recheck", "Look again"), Binding("q", "app.quit", "Quit")]
    app: LvaApp                                  # for the type checker: the app it runs in

    def compose(self) -> ComposeResult:
        with Center(), Vertical(id="first-run"):
            yield Markdown(HOW_TO.format(models=store.models_dir()))
        yield Footer()

    def action_recheck(self) -> None:
        if any(m.text for m in store.installed_models()):
            self.app.start_chat()
        else:
            self.notify("Still no model in " + str(store.models_dir()), severity="warning")
