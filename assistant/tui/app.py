"""`LvaApp`: chat with Llama 3.2 Vision about one image, offline, with the conversations kept.

The app owns what lives as long as it does: the history, the loaded model and its chat engine, and the
settings for new conversations. The model loads in a worker; `ChatScreen` does the chatting.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from assistant import store
from assistant.chat import saved
from assistant.chat.engine import ChatEngine
from assistant.history import History
from assistant.tui.screens.chat import ChatScreen
from assistant.tui.screens.first_run import FirstRunScreen
from assistant.tui.screens.help import HelpScreen
from assistant.tui.screens.models import ModelsScreen
from assistant.tui.screens.settings import Settings, SettingsScreen
from models.errors import LvaError

if TYPE_CHECKING:
    from assistant.runtime import MllamaModel


class LvaApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "lva"
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
        Binding("f3", "models", "Models"),
        Binding("f5", "settings", "Settings"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, model_path: Path | None = None, n_ctx: int = 4096, n_gpu_layers: int = -1,
                 rpc_servers: Sequence[str] = ()) -> None:
        """`model_path`: a text GGUF; None chooses the only installed model (or asks, when there are several).
        `n_gpu_layers` and `rpc_servers` say where it runs, as `load_model`'s do."""
        super().__init__()
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_gpu_layers, self.rpc_servers = n_gpu_layers, list(rpc_servers)
        self.history = History()
        self.settings = Settings()
        self.model: MllamaModel | None = None
        self.engine: ChatEngine | None = None
        self.model_lock = threading.Lock()       # the model runs one worker at a time (encode ahead, answer)

    @property
    def model_label(self) -> str:
        return f"loading {self.model_path.name}…" if self.model_path else "no model"

    def on_mount(self) -> None:
        installed = [m for m in store.installed_models() if m.text is not None]
        if self.model_path is None and not installed:
            self.push_screen(FirstRunScreen())
            return
        self.start_chat()

    def start_chat(self) -> None:
        installed = [m for m in store.installed_models() if m.text is not None]
        if isinstance(self.screen, FirstRunScreen):
            self.switch_screen(ChatScreen())
        else:
            self.push_screen(ChatScreen())
        if self.model_path is None and len(installed) == 1:
            self.model_path = installed[0].text
        if self.model_path is not None:
            self.load(self.model_path)
        else:
            self.action_models()

    @property
    def chat(self) -> ChatScreen | None:
        found = [s for s in self.screen_stack if isinstance(s, ChatScreen)]
        return found[0] if found else None

    # ------------------------------------------------------------------------------------------ the model

    @work(thread=True, exclusive=True, group="model")
    def load(self, text_path: Path) -> None:
        """Load a model with a progress bar; the previous one is closed once the new one is ready."""
        from assistant import load_model
        from assistant.chat.feature_cache import FeatureCache

        def progress(stage: str, fraction: float) -> None:
            if self.chat is not None:
                self.call_from_thread(self.chat.show_progress, f"loading {stage}", min(fraction, 0.999))

        try:
            model = load_model(text_path, n_ctx=self.n_ctx, progress=progress, feature_cache=FeatureCache(),
                               n_gpu_layers=self.n_gpu_layers, rpc_servers=self.rpc_servers)
            engine = ChatEngine(model)
        except (LvaError, OSError) as error:
            self.call_from_thread(self.notify, str(error), title="Cannot load the model", severity="error")
            return
        finally:
            if self.chat is not None:
                self.call_from_thread(self.chat.show_progress, "", 1.0)
        with self.model_lock:                    # not while the old model is encoding or answering
            self.call_from_thread(self._model_loaded, text_path, model, engine)

    def _model_loaded(self, text_path: Path, model, engine: ChatEngine) -> None:
        old, self.model, self.engine, self.model_path = self.model, model, engine, text_path
        if old is not None:
            old.close()
        if self.chat is not None:
            self.chat.update_status()

    async def on_unmount(self) -> None:
        """Quitting mid-answer or mid-encode: the worker stops at its next token or stage and lets go of the
        model before it is closed (closing it under a running decode would crash the process). The loop keeps
        running meanwhile, so the worker's last calls into the app are answered."""
        if self.engine is not None:
            self.engine.stop()
        self.workers.cancel_all()
        while not self.model_lock.acquire(blocking=False):
            await asyncio.sleep(0.02)
        try:
            if self.model is not None:
                self.model.close()
        finally:
            self.model_lock.release()
        self.history.close()

    # ------------------------------------------------------------------------------------------ actions

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        bindings = [*(ChatScreen.BINDINGS if self.chat is not None else []), *self.BINDINGS]
        self.push_screen(HelpScreen([b for b in bindings if isinstance(b, Binding)]))

    def action_models(self) -> None:
        if self.chat is None or isinstance(self.screen, ModelsScreen):
            return

        def chosen(path: Path | None) -> None:
            if path is None or path == (self.model_path if self.model else None):
                return
            if self.chat is not None and self.chat.generating:
                self.notify("Stop the answer before switching models", severity="warning")
                return
            self.model_path = path
            self.load(path)

        self.push_screen(ModelsScreen(self.model_path), chosen)

    def action_settings(self) -> None:
        chat = self.chat
        if chat is None or isinstance(self.screen, SettingsScreen):
            return
        current = Settings(chat.conversation.system_prompt, chat.conversation.sampling)

        def apply(settings: Settings | None) -> None:
            if settings is not None:
                self.settings = settings
                chat.conversation.system_prompt = settings.system_prompt
                chat.conversation.sampling = settings.sampling
                if chat.conversation_id is not None:
                    saved.save_settings(self.history, chat.conversation_id, chat.conversation)
                self.notify("Settings saved")

        self.push_screen(SettingsScreen(current), apply)

    def get_system_commands(self, screen: Screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: every key", "List every key (F1)", self.action_help)
        yield SystemCommand("Settings", "System prompt, temperature, top-p, max tokens, seed (F5)",
                            self.action_settings)
        yield SystemCommand("Models", "Installed models; switch (F3)", self.action_models)
        if isinstance(screen, ChatScreen):
            yield SystemCommand("New conversation", "Start a new conversation (Ctrl+N)",
                                screen.action_new_conversation)
            yield SystemCommand("Attach image", "Choose an image file (Ctrl+O)", screen.action_open_image)
            yield SystemCommand("Remove image", "Drop the image waiting to be sent (F4)", screen.action_remove_image)
            yield SystemCommand("Search conversations", "Search titles and messages (Ctrl+F)", screen.action_search)
            yield SystemCommand("Rename conversation", "Give the conversation a title (F2)", screen.action_rename)
            yield SystemCommand("Delete conversation", "Delete the conversation (F8)", screen.action_delete)
            yield SystemCommand("Stop answer", "Stop the answer, keeping what was written (Esc)", screen.action_stop)
            yield SystemCommand("Regenerate", "Answer the last message again (Ctrl+R)", screen.action_regenerate)
            yield SystemCommand("Edit last message", "Edit it and answer again (Ctrl+E)", screen.action_edit_last)
