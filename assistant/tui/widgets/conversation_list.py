"""The sidebar: a search box over the kept conversations, most recent first."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option

from assistant.history import History


class ConversationList(Vertical):
    """Lists `History` conversations; selecting one posts `Selected`; a search query filters them."""

    class Selected(Message):
        def __init__(self, conversation_id: int) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    def __init__(self, history: History, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history = history
        self.current: int | None = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search (Ctrl+F)", id="conversation-search")
        yield OptionList(id="conversation-options")

    def on_mount(self) -> None:
        self.refresh_list()

    @property
    def query_text(self) -> str:
        return self.query_one("#conversation-search", Input).value.strip()

    def refresh_list(self) -> None:
        """Reload from the history, keeping the search and highlighting the current conversation."""
        options = self.query_one("#conversation-options", OptionList)
        if self.query_text:
            found = [(c, snippet) for c, snippet in self.history.search(self.query_text)]
        else:
            found = [(c, "") for c in self.history.list_conversations()]
        options.clear_options()
        for conversation, snippet in found:
            title = conversation.title or f"Conversation {conversation.id}"
            label = f"{title}\n[dim]{snippet}[/]" if snippet else title
            options.add_option(Option(label, id=str(conversation.id)))
        shown = [str(conversation.id) for conversation, _ in found]
        if self.current is not None and str(self.current) in shown:     # a search may have filtered it out
            options.highlighted = shown.index(str(self.current))

    @property
    def conversation_ids(self) -> list[int]:
        options = self.query_one("#conversation-options", OptionList)
        return [_conversation_id(options.get_option_at_index(i)) for i in range(options.option_count)]

    def highlighted_id(self) -> int | None:
        options = self.query_one("#conversation-options", OptionList)
        if options.highlighted is None:
            return None
        return _conversation_id(options.get_option_at_index(options.highlighted))

    def focus_search(self) -> None:
        self.query_one("#conversation-search", Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.refresh_list()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.query_one("#conversation-options", OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.post_message(self.Selected(_conversation_id(event.option)))


def _conversation_id(option: Option) -> int:
    """The conversation an option shows: `refresh_list` gives every option its id."""
    assert option.id is not None
    return int(option.id)
