"""Exporting a kept conversation (Markdown, JSON) and importing the JSON: round trips, images, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from assistant.history import History, HistoryError
from assistant.history.export import export_json, export_markdown, import_json
from tests.test_history import count_rows, make_png


@pytest.fixture
def history(lva_home: Path) -> Iterator[History]:
    with History() as opened:
        yield opened


def rich_conversation(history: History, tmp_path: Path) -> int:
    image = history.add_image(make_png(tmp_path / "diagram.png"))
    conversation = history.new_conversation("Reading a diagram", system_prompt="Answer in one line.\nBe kind.",
                                            model="tiny-Q8_0", sampling={"temperature": 0.6, "seed": 7})
    history.set_conversation_image(conversation.id, image.id)
    history.add_message(conversation.id, "user", "What does the arrow mean?", image_id=image.id, prompt_tokens=40)
    history.add_message(conversation.id, "assistant", "It shows the flow of", prompt_tokens=40,
                        completion_tokens=6, seconds=0.75, model="tiny-Q8_0", sampling={"temperature": 0.6},
                        status="stopped")
    history.add_message(conversation.id, "user", "Go on.")
    history.add_message(conversation.id, "assistant", "", status="error")
    return conversation.id


def test_markdown_export_contains_every_turn(history: History, tmp_path: Path) -> None:
    markdown = export_markdown(history, rich_conversation(history, tmp_path))
    assert markdown.startswith("# Reading a diagram\n")
    assert "> Answer in one line.\n> Be kind." in markdown
    turns = ["## User\n", "What does the arrow mean?", "## Assistant\n", "It shows the flow of",
             "stopped before the end · 6 tokens · 0.8 s", "## User\n", "Go on.", "## Assistant\n", "failed"]
    cursor = 0
    for turn in turns:      # str.index raises if a turn is missing or out of order
        cursor = markdown.index(turn, cursor) + len(turn)
    assert "](file://" in markdown and "diagram.png" in markdown


def test_json_round_trip_keeps_the_content(history: History, tmp_path: Path) -> None:
    exported = export_json(history, rich_conversation(history, tmp_path))
    imported = import_json(history, json.dumps(exported))
    assert export_json(history, imported.id) == exported
    assert exported["format"] == "lva-conversation" and exported["version"] == 1
    assert "data" not in next(iter(exported["images"].values()))


def test_an_export_with_image_data_restores_the_images_in_another_history(history: History, tmp_path: Path) -> None:
    exported = export_json(history, rich_conversation(history, tmp_path), include_images=True)
    with History(tmp_path / "elsewhere" / "history.sqlite3") as elsewhere:
        imported = import_json(elsewhere, json.loads(json.dumps(exported)))
        assert export_json(elsewhere, imported.id, include_images=True) == exported
        restored = elsewhere.image_path(imported.image_id)
        assert restored.read_bytes() == history.image_path(imported.image_id).read_bytes()
        assert elsewhere.images_dir == tmp_path / "elsewhere" / "images"


def test_an_export_without_image_data_imports_with_the_images_folder(history: History, tmp_path: Path) -> None:
    exported = export_json(history, rich_conversation(history, tmp_path))
    with History(tmp_path / "elsewhere" / "history.sqlite3") as elsewhere:
        with pytest.raises(HistoryError, match="diagram.png is not embedded and not found"):
            import_json(elsewhere, exported)
        assert elsewhere.list_conversations() == []
        for images_dir in (history.images_dir, tmp_path):   # another lva's store; the originals by name
            imported = import_json(elsewhere, exported, images_dir=images_dir)
            assert elsewhere.image_path(imported.image_id).is_file()


def test_an_import_that_fails_on_one_image_stores_nothing_at_all(history: History, tmp_path: Path) -> None:
    conversation = history.new_conversation()
    for color in ("red", "blue"):
        image = history.add_image(make_png(tmp_path / f"{color}.png", color=color))
        history.add_message(conversation.id, "user", color, image_id=image.id)
    exported = export_json(history, conversation.id, include_images=True)
    del exported["images"][image.id]["data"]    # the blue one is now neither embedded nor findable
    with History(tmp_path / "elsewhere" / "history.sqlite3") as elsewhere:
        with pytest.raises(HistoryError, match="blue.png is not embedded"):
            import_json(elsewhere, exported)
        assert elsewhere.list_conversations() == []
        assert count_rows(elsewhere.path, "images") == 0
        assert not elsewhere.images_dir.exists()


def valid_export() -> dict:
    return {"format": "lva-conversation", "version": 1, "title": "t",
            "messages": [{"role": "user", "text": "hi"}]}


def broken(**changes) -> dict:
    """A valid export with top-level `changes`; `message={...}` changes its one message."""
    export = valid_export()
    export["messages"][0].update(changes.pop("message", {}))
    export.update(changes)
    return export


@pytest.mark.parametrize("data, message", [
    ("{not json", "import: not JSON"),
    ("[1, 2]", "import: expected a JSON object"),
    (broken(format="chatgpt"), "not an lva conversation"),
    (broken(version=2), "unsupported lva-conversation version 2"),
    (broken(messages="hello"), "conversation.messages should be a list, not text"),
    (broken(title=12), "conversation.title should be text or null, not an integer"),
    (broken(message={"role": "bot"}), r"messages\[0\].role must be one of system, user, assistant"),
    (broken(message={"text": None}), r"messages\[0\].text should be text, not null"),
    (broken(message={"prompt_tokens": "12"}), r"messages\[0\].prompt_tokens should be an integer or null"),
    (broken(message={"seconds": True}), r"messages\[0\].seconds should be .*, not true/false"),
    (broken(message={"created_at": "yesterday"}), "is not an ISO 8601 time"),
    (broken(image="../../etc/passwd"), "is not a sha256 hex digest"),
    (broken(image="a" * 64, images={"a" * 64: {"name": "x.png", "data": "!!"}}), "is not base64"),
    (broken(image="a" * 64, images={"a" * 64: {"name": "x.png", "data": "aGVsbG8="}}), "does not match its sha256"),
], ids=["not-json", "not-an-object", "other-format", "newer-version", "messages-not-a-list", "title-not-text",
        "unknown-role", "null-text", "tokens-as-text", "seconds-as-bool", "bad-time", "image-id-not-a-sha",
        "image-data-not-base64", "image-data-not-matching-its-sha"])
def test_importing_bad_json_is_a_one_line_history_error_and_writes_nothing(
        history: History, data, message: str) -> None:
    with pytest.raises(HistoryError, match=message) as raised:
        import_json(history, data)
    assert "\n" not in str(raised.value)
    assert history.list_conversations() == []


def test_an_import_without_timestamps_or_statuses_gets_defaults(history: History) -> None:
    imported = import_json(history, valid_export())
    [message] = history.messages(imported.id)
    assert (imported.title, message.role, message.text, message.status, message.position) == (
        "t", "user", "hi", "complete", 0)
