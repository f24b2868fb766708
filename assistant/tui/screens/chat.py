"""The main screen: the sidebar of conversations, the chat, the attachment, the input box and the status bar."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from textual import on, work
from textual.worker import get_current_worker
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Label, ProgressBar

from assistant.chat import saved
from assistant.chat.engine import ChatEngine, Conversation, Reply, Turn
from assistant.images import ImageError, load_image
from assistant.runtime import EncodeCancelled
from assistant.tui.widgets.attachment_bar import AttachmentBar, describe_image
from assistant.tui.widgets.chat_log import AssistantMessage, ChatLog
from assistant.tui.widgets.conversation_list import ConversationList
from assistant.tui.widgets.prompt_input import PromptInput
from assistant.tui.widgets.status_bar import StatusBar
from models.errors import LvaError

if TYPE_CHECKING:
    from assistant.tui.app import LvaApp

STREAM_EVERY_SECONDS = 0.05       # how often the worker hands the growing answer to the UI

# In the answering worker: update the conversation and the history for a new answer; the conversation's id
# in the history and the answer's pieces.
Begin = Callable[[list[Reply]], tuple[int, Iterator[str]]]


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop answer", priority=True),
        Binding("ctrl+n", "new_conversation", "New chat", priority=True),
        Binding("ctrl+o", "open_image", "Attach image", priority=True),
        Binding("f4", "remove_image", "Remove image"),
        Binding("ctrl+f", "search", "Search", priority=True),
        Binding("f2", "rename", "Rename"),
        Binding("f8", "delete", "Delete chat"),
        Binding("ctrl+r", "regenerate", "Answer the last message again", show=False, priority=True),
        Binding("ctrl+e", "edit_last", "Edit the last message", show=False, priority=True),
        Binding("ctrl+l", "focus_input", "Input", show=False, priority=True),
    ]

    app: LvaApp                                  # for the type checker: the app it runs in, its model and history

    def __init__(self) -> None:
        super().__init__()
        self.conversation = Conversation(system_prompt=None)
        self.conversation_id: int | None = None
        self.attachment: Path | None = None
        self.generating = False
        self.editing: int | None = None          # the user turn the input box is rewriting (Ctrl+E)

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield ConversationList(self.app.history, id="sidebar")
            with Vertical(id="chat"):
                with Horizontal(id="progress"):
                    yield Label("", id="progress-label")
                    yield ProgressBar(total=1.0, show_eta=False, id="progress-bar")
                yield ChatLog(id="chat-log")
                yield AttachmentBar(id="attachment")
                yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(PromptInput).focus()
        last = self.app.history.last_conversation()
        if last is not None:
            self.open_conversation(last.id)
        else:
            self.new_conversation()

    # ------------------------------------------------------------------------------------------ conversations

    @property
    def sidebar(self) -> ConversationList:
        return self.query_one(ConversationList)

    def new_conversation(self) -> None:
        settings = self.app.settings
        self.conversation = Conversation(system_prompt=settings.system_prompt, sampling=settings.sampling)
        self.conversation_id = None
        self.sidebar.current = None
        self.query_one(ChatLog).clear()
        self.set_attachment(None)
        self.set_editing(None)
        self.update_status()

    def open_conversation(self, conversation_id: int) -> None:
        """Show a kept conversation; its last image is what the next message is about."""
        if self.generating:
            self.notify("Wait for the answer, or stop it with Esc", severity="warning")
            return
        self.conversation = saved.load(self.app.history, conversation_id)
        self.conversation_id = conversation_id
        self.sidebar.current = conversation_id
        self.show_turns(self.conversation.turns)
        self.set_attachment(None)
        self.set_editing(None)
        self.sidebar.refresh_list()
        self.update_status()

    def show_turns(self, turns: list[Turn]) -> None:
        """Fill the chat log with a kept conversation's turns, its images under their original names."""
        names = saved.image_names(self.app.history, self.conversation_id) if self.conversation_id else {}
        log = self.query_one(ChatLog)
        log.clear()
        for turn in turns:
            if turn.role == "user":
                image = turn.image if isinstance(turn.image, Path) and turn.image.is_file() else None
                log.add_user(turn.text, image, names.get(image) if image else None)
            else:
                log.add_assistant(turn.text).finish(turn.status)

    @on(ConversationList.Selected)
    def conversation_selected(self, event: ConversationList.Selected) -> None:
        self.open_conversation(event.conversation_id)
        self.query_one(PromptInput).focus()

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self.app.history.rename(conversation_id, title.strip() or None)
        self.sidebar.refresh_list()

    def delete_conversation(self, conversation_id: int) -> None:
        if self.generating and conversation_id == self.conversation_id:
            self.notify("Stop the answer before deleting its conversation", severity="warning")
            return
        self.app.history.delete(conversation_id)
        if conversation_id == self.conversation_id:
            self.new_conversation()
        self.sidebar.refresh_list()
        self.notify("Conversation deleted")

    def _target_conversation(self) -> int | None:
        """The sidebar's highlighted conversation when the sidebar has focus, else the open one."""
        if self.focused is not None and self.sidebar in self.focused.ancestors_with_self:
            return self.sidebar.highlighted_id() or self.conversation_id
        return self.conversation_id

    # ------------------------------------------------------------------------------------------ the image

    def attach(self, path: Path) -> bool:
        """Check and show an image for the next message; a bad one is a notification."""
        try:
            picture = load_image(path)
        except ImageError as error:
            self.notify(str(error), title="Cannot attach", severity="error")
            return False
        except OSError as error:
            self.notify(f"{path}: {error.strerror or error}", title="Cannot attach", severity="error")
            return False
        self.set_attachment(path, describe_image(path, *picture.size))
        return True

    def set_attachment(self, path: Path | None, description: str = "") -> None:
        """Show (or clear) the image for the next message, and start encoding it while the message is typed;
        removing or replacing it cancels that encode."""
        self.attachment = path
        self.query_one(AttachmentBar).attach(path, description)
        self.workers.cancel_group(self, "encode")
        model = self.app.model
        if path is not None and model is not None and model.vision is not None:
            self.encode_ahead(path)

    @work(thread=True, exclusive=True, group="encode")
    def encode_ahead(self, path: Path) -> None:
        """Encode the attached image into the model's caches (memory and disk); sending finds it there.

        The model runs one thing at a time: this holds the app's model lock, so a message sent meanwhile
        waits for the encode instead of starting a second one."""
        app, worker = self.app, get_current_worker()
        with app.model_lock:
            if worker.is_cancelled or app.model is None:
                return
            try:
                app.model.encode_image(path, cancelled=lambda: worker.is_cancelled,
                                       progress=lambda stage, f: app.call_from_thread(self.show_progress, stage, f))
            except EncodeCancelled:
                pass                                  # removed or replaced: its successor, if any, is queued
            except (LvaError, OSError) as error:
                app.call_from_thread(self.notify, str(error), title="Cannot encode the image", severity="error")
            finally:
                app.call_from_thread(self.show_progress, "", 1.0)

    @on(PromptInput.ImagePasted)
    def image_pasted(self, event: PromptInput.ImagePasted) -> None:
        self.attach(event.path)

    @on(AttachmentBar.Removed)
    def attachment_removed(self) -> None:
        self.action_remove_image()

    # ------------------------------------------------------------------------------------------ sending

    @on(PromptInput.Submitted)
    def prompt_submitted(self, event: PromptInput.Submitted) -> None:
        prompt = self.query_one(PromptInput)
        text = event.text.strip()
        if text.startswith("/image"):
            prompt.clear()
            if self.attach(Path(text.removeprefix("/image").strip().strip("'\"")).expanduser()):
                prompt.focus()
            return
        engine = self.ready_engine() if text else None
        if engine is None:
            return
        prompt.clear()
        if self.editing is not None:
            self.send_edit(engine, self.editing, text)
            return
        image, self.attachment = self.attachment, None
        self.query_one(AttachmentBar).attach(None)
        self.query_one(ChatLog).add_user(text, image)
        history, model_name = self.app.history, engine.model.text_path.name
        conversation, conversation_id = self.conversation, self.conversation_id

        def begin(replies: list[Reply]) -> tuple[int, Iterator[str]]:
            pieces = engine.send(conversation, text, image, on_reply=replies.append)
            kept_as = conversation_id
            if kept_as is None:
                title = text or (image.name if image else "New conversation")
                kept_as = saved.start(history, conversation, model_name, title)
                self.app.call_from_thread(self._conversation_started, kept_as)
            saved.save_user_turn(history, kept_as, conversation.turns[-1])
            return kept_as, pieces
        self.answer(engine, begin)

    def ready_engine(self) -> ChatEngine | None:
        """The engine to answer with; None, with a notice, while it answers or the model loads."""
        if self.generating:
            self.notify("Still answering; Esc stops it", severity="warning")
            return None
        if self.app.engine is None:
            self.notify("The model is not loaded yet", severity="warning")
        return self.app.engine

    def send_edit(self, engine: ChatEngine, index: int, text: str) -> None:
        """Replace user turn `index` with `text`, forget what came after it, and answer again."""
        self.set_editing(None)
        turns = self.conversation.turns
        self.show_turns([*turns[:index], replace(turns[index], text=text)])
        history, conversation, conversation_id = self.app.history, self.conversation, self.conversation_id
        assert conversation_id is not None       # only a kept conversation's turns are edited (last_user_turn)

        def begin(replies: list[Reply]) -> tuple[int, Iterator[str]]:
            saved.rewind(history, conversation_id, index)
            pieces = engine.edit(conversation, index, text, on_reply=replies.append)
            saved.save_user_turn(history, conversation_id, conversation.turns[index])
            return conversation_id, pieces
        self.answer(engine, begin)

    def answer(self, engine: ChatEngine, begin: Begin) -> None:
        """Answer in a worker, into a new message at the end of the log."""
        self.generating = True
        message = self.query_one(ChatLog).add_assistant(status="stopped")
        self.stream_answer(engine, begin, self.conversation, message)

    @work(thread=True, exclusive=True, group="generation")
    def stream_answer(self, engine: ChatEngine, begin: Begin, conversation: Conversation,
                      message: AssistantMessage) -> None:
        """`begin` updates `conversation` and the history and returns the answer's pieces; the image is
        encoded first (with a progress bar, instant when cached), then the answer streams into `message`.

        A worker thread: it changes the screen only through `call_from_thread`, and reads nothing of it but
        what it was given (`generating` keeps the conversation from being switched meanwhile)."""
        app, model = self.app, engine.model
        status = "error"
        app.model_lock.acquire()                  # after an encode of the attached image still running
        try:
            replies: list[Reply] = []
            conversation_id, pieces = begin(replies)
            _, image = engine.current_image(conversation)
            if image is not None and model.vision is not None:
                model.encode_image(image, progress=lambda stage, f: app.call_from_thread(self.show_progress, stage, f))
                app.call_from_thread(self.show_progress, "encoding image", 1.0)
            answer, shown_at = "", 0.0
            for piece in saved.stream_answer(app.history, conversation_id, pieces, model.text_path.name,
                                             conversation.sampling, replies):
                answer += piece
                if time.monotonic() - shown_at > STREAM_EVERY_SECONDS:
                    app.call_from_thread(message.show, answer)
                    shown_at = time.monotonic()
            app.call_from_thread(message.show, answer, True)
            reply = replies[-1]
            status = reply.status
            app.call_from_thread(self.update_status, reply)
            if reply.done_reason == "length":
                limit = conversation.sampling.max_tokens
                app.call_from_thread(self.notify, f"The answer reached its limit of {limit} tokens; "
                                     "Settings (F5) can raise it.", title="Answer cut")
        except (LvaError, OSError) as error:
            app.call_from_thread(self.notify, str(error), title="Cannot answer", severity="error")
        finally:
            app.model_lock.release()
            app.call_from_thread(self._generation_done, message, status)

    def _conversation_started(self, conversation_id: int) -> None:
        self.conversation_id = conversation_id
        self.sidebar.current = conversation_id
        self.sidebar.refresh_list()

    def _generation_done(self, message: AssistantMessage, status: str) -> None:
        self.generating = False
        self.show_progress("", 1.0)
        if status != "error":
            message.finish(status)
        elif self.conversation_id is not None:
            self.open_conversation(self.conversation_id)      # back in step with what the history kept
        else:
            message.remove()
            if self.conversation.turns and self.conversation.turns[-1].role == "user":
                self.conversation.turns.pop()
        self.sidebar.refresh_list()

    # ------------------------------------------------------------------------------------------ progress, status

    def show_progress(self, stage: str, fraction: float) -> None:
        """A progress bar for long work (model loading, image encoding); hidden when it is done."""
        try:
            progress = self.query_one("#progress")
            label, bar = self.query_one("#progress-label", Label), self.query_one("#progress-bar", ProgressBar)
        except NoMatches:               # the model started loading before this screen was composed: the
            return                      # container may be mounted before its children
        progress.set_class(fraction < 1.0, "-busy")
        label.update(stage)
        bar.update(progress=fraction)

    def update_status(self, reply: Reply | None = None) -> None:
        status = self.query_one(StatusBar)
        model = self.app.model
        if model is None:
            status.model_name = self.app.model_label
            return
        status.model_name = model.text_path.name
        status.context_size = model.n_ctx
        status.device = model.placement.summary()
        if reply is not None:
            status.context_used = reply.prompt_tokens + reply.completion_tokens
            status.tokens_per_second = reply.completion_tokens / reply.seconds if reply.seconds else 0.0
        elif not self.conversation.turns:
            status.context_used = 0

    # ------------------------------------------------------------------------------------------ actions

    def action_stop(self) -> None:
        if self.generating and self.app.engine is not None:
            self.app.engine.stop()
        elif self.editing is not None:
            self.set_editing(None)
            self.query_one(PromptInput).clear()
        elif self.focused is not self.query_one(PromptInput):
            self.query_one(PromptInput).focus()

    def set_editing(self, index: int | None) -> None:
        self.editing = index
        prompt = self.query_one(PromptInput)
        prompt.border_title = None if index is None else "Editing your message: Enter sends it, Esc cancels"
        prompt.set_class(index is not None, "-editing")

    def last_user_turn(self) -> int | None:
        """The index of the last message of yours in a kept conversation, if there is one to act on."""
        if self.conversation_id is None:
            return None
        users = [i for i, turn in enumerate(self.conversation.turns) if turn.role == "user"]
        return users[-1] if users else None

    def action_regenerate(self) -> None:
        """Answer the last message again, in place of the last answer."""
        index = self.last_user_turn()
        if index is None:
            self.notify("Nothing to answer again yet", severity="warning")
            return
        engine = self.ready_engine()
        if engine is None:
            return
        self.show_turns(self.conversation.turns[:index + 1])
        history, conversation, conversation_id = self.app.history, self.conversation, self.conversation_id
        assert conversation_id is not None       # last_user_turn: only a kept conversation has one

        def begin(replies: list[Reply]) -> tuple[int, Iterator[str]]:
            saved.rewind(history, conversation_id, index + 1)
            return conversation_id, engine.regenerate(conversation, on_reply=replies.append)
        self.answer(engine, begin)

    def action_edit_last(self) -> None:
        """Put the last message of yours in the input box; sending it replaces it and what followed."""
        index = self.last_user_turn()
        if index is None:
            self.notify("Nothing to edit yet", severity="warning")
            return
        if self.generating:
            self.notify("Wait for the answer, or stop it with Esc", severity="warning")
            return
        prompt = self.query_one(PromptInput)
        prompt.text = self.conversation.turns[index].text
        prompt.move_cursor(prompt.document.end)
        prompt.focus()
        self.set_editing(index)

    def action_new_conversation(self) -> None:
        if self.generating:
            self.notify("Wait for the answer, or stop it with Esc", severity="warning")
            return
        self.new_conversation()
        self.query_one(PromptInput).focus()

    def action_open_image(self) -> None:
        from assistant.tui.screens.open_image import OpenImageScreen

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.attach(path)

        self.app.push_screen(OpenImageScreen(), chosen)

    def action_remove_image(self) -> None:
        if self.attachment is not None:
            self.set_attachment(None)
            self.notify("Image removed")

    def action_search(self) -> None:
        self.sidebar.focus_search()

    def action_focus_input(self) -> None:
        self.query_one(PromptInput).focus()

    def action_rename(self) -> None:
        from assistant.tui.screens.rename import RenameScreen

        target = self._target_conversation()
        if target is None:
            self.notify("Nothing to rename yet: send a message first", severity="warning")
            return
        title = self.app.history.conversation(target).title or ""

        def renamed(new_title: str | None) -> None:
            if new_title is not None:
                self.rename_conversation(target, new_title)

        self.app.push_screen(RenameScreen(title), renamed)

    def action_delete(self) -> None:
        from assistant.tui.screens.confirm import ConfirmScreen

        target = self._target_conversation()
        if target is None:
            self.notify("Nothing to delete", severity="warning")
            return
        title = self.app.history.conversation(target).title or "this conversation"

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.delete_conversation(target)

        self.app.push_screen(ConfirmScreen(f"Delete “{title}” and its messages?", "Delete"), confirmed)
