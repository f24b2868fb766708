"""The conversation history: real SQLite files, real image files, real processes (killed ones included)."""

from __future__ import annotations

import itertools
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from assistant.history import History, HistoryError
from assistant.history.export import export_json, export_markdown
from assistant.history.migrations import MIGRATIONS, migrate, schema_version
from models.errors import LvaError

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def history(lva_home: Path) -> Iterator[History]:
    with History() as opened:
        yield opened


def make_png(path: Path, size: tuple[int, int] = (40, 30), color: str = "red") -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def count_rows(database: Path, table: str) -> int:
    with sqlite3.connect(database) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def assert_sound(database: Path) -> None:
    """SQLite's own consistency check, plus FTS5's check that the index matches the text."""
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
        db.execute("INSERT INTO conversations_fts(conversations_fts) VALUES ('integrity-check')")


# --- conversations ---

def test_the_history_lives_in_the_data_dir_with_images_beside_it(lva_home: Path, tmp_path: Path) -> None:
    with History() as history:
        image = history.add_image(make_png(tmp_path / "cat.png"))
        assert history.path == lva_home / "history.sqlite3"
        assert history.image_path(image.id).is_relative_to(lva_home / "images")
    assert (lva_home / "history.sqlite3").is_file()


def test_conversations_are_listed_most_recently_active_first(history: History) -> None:
    first = history.new_conversation("first")
    second = history.new_conversation("second")
    assert [c.title for c in history.list_conversations()] == ["second", "first"]
    history.add_message(first.id, "user", "back to the first one")
    assert [c.title for c in history.list_conversations()] == ["first", "second"]
    assert [c.id for c in history.list_conversations(limit=1)] == [first.id]
    assert history.last_conversation().id == first.id
    assert second.id != first.id


def test_a_new_history_has_no_last_conversation(history: History) -> None:
    assert history.last_conversation() is None
    assert history.list_conversations() == []


def test_a_conversation_keeps_its_settings(history: History) -> None:
    made = history.new_conversation("settings", system_prompt="Be brief.", model="llama-3.2-11b-vision-Q4_K",
                                    sampling={"temperature": 0.6, "top_p": 0.9})
    again = history.conversation(made.id)
    assert again == made
    assert (again.system_prompt, again.model, again.sampling) == (
        "Be brief.", "llama-3.2-11b-vision-Q4_K", {"temperature": 0.6, "top_p": 0.9})


def test_rename_changes_only_the_title(history: History) -> None:
    conversation = history.new_conversation("old title", system_prompt="keep me")
    renamed = history.rename(conversation.id, "new title")
    assert (renamed.title, renamed.system_prompt) == ("new title", "keep me")
    assert history.conversation(conversation.id).title == "new title"


def test_delete_removes_the_conversation_its_messages_and_images_nothing_else_shows(
        history: History, tmp_path: Path) -> None:
    shared = history.add_image(make_png(tmp_path / "shared.png"))
    private = history.add_image(make_png(tmp_path / "private.png", color="blue"))
    doomed = history.new_conversation("doomed")
    kept = history.new_conversation("kept")
    for conversation in (doomed, kept):
        history.add_message(conversation.id, "user", "look", image_id=shared.id)
    history.add_message(doomed.id, "user", "and this", image_id=private.id)
    private_file = history.image_path(private.id)
    history.delete(doomed.id)
    assert [c.id for c in history.list_conversations()] == [kept.id]
    assert count_rows(history.path, "messages") == 1
    assert history.image_path(shared.id).is_file()
    assert not private_file.exists()
    with pytest.raises(HistoryError):
        history.image(private.id)
    with pytest.raises(HistoryError):
        history.conversation(doomed.id)
    shared_file = history.image_path(shared.id)
    history.delete(kept.id)
    assert count_rows(history.path, "images") == 0 and not shared_file.exists()
    assert history.image_path(history.add_image(make_png(tmp_path / "shared.png")).id).is_file()


@pytest.mark.parametrize("call", [
    lambda h: h.conversation(404),
    lambda h: h.messages(404),
    lambda h: h.add_message(404, "user", "hello"),
    lambda h: h.update_message(404, text="hello"),
    lambda h: h.rename(404, "title"),
    lambda h: h.delete(404),
    lambda h: export_markdown(h, 404),
    lambda h: export_json(h, 404),
    lambda h: h.image_path("0" * 64),
], ids=["conversation", "messages", "add_message", "update_message", "rename", "delete", "export_markdown",
        "export_json", "image_path"])
def test_unknown_ids_are_one_line_history_errors(history: History, call) -> None:
    with pytest.raises(HistoryError) as raised:
        call(history)
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, LvaError)


def test_a_bad_role_or_status_is_refused_before_anything_is_written(history: History) -> None:
    conversation = history.new_conversation()
    with pytest.raises(HistoryError, match="role must be one of system, user, assistant"):
        history.add_message(conversation.id, "bot", "hi")
    with pytest.raises(HistoryError, match="status must be one of"):
        history.add_message(conversation.id, "assistant", "hi", status="done")
    assert history.messages(conversation.id) == []


# --- messages ---

def test_messages_come_back_in_order_with_token_counts_and_timings(history: History) -> None:
    conversation = history.new_conversation("order")
    history.add_message(conversation.id, "system", "You are helpful.")
    history.add_message(conversation.id, "user", "What is in the picture?", prompt_tokens=1612)
    history.add_message(conversation.id, "assistant", "A red square.", prompt_tokens=1612,
                        completion_tokens=5, seconds=1.25, model="tiny", sampling={"temperature": 0.0})
    messages = history.messages(conversation.id)
    assert [(m.position, m.role, m.text) for m in messages] == [
        (0, "system", "You are helpful."), (1, "user", "What is in the picture?"), (2, "assistant", "A red square.")]
    answer = messages[2]
    assert (answer.prompt_tokens, answer.completion_tokens, answer.seconds) == (1612, 5, 1.25)
    assert (answer.model, answer.sampling, answer.status) == ("tiny", {"temperature": 0.0}, "complete")
    assert messages[0].created_at <= messages[1].created_at <= messages[2].created_at


def test_a_streamed_answer_is_kept_as_stopped_until_marked_complete(history: History) -> None:
    conversation = history.new_conversation()
    answer = history.add_message(conversation.id, "assistant", "", status="stopped")
    for text in ("The", "The sky", "The sky is blue"):
        history.update_message(answer.id, text=text, completion_tokens=len(text.split()))
    partial = history.messages(conversation.id)[0]
    assert (partial.text, partial.status, partial.completion_tokens) == ("The sky is blue", "stopped", 4)
    done = history.update_message(answer.id, status="complete", seconds=0.5)
    assert (done.text, done.status, done.completion_tokens, done.seconds) == ("The sky is blue", "complete", 4, 0.5)


def test_delete_messages_after_drops_later_turns_and_new_turns_follow_on(history: History) -> None:
    conversation = history.new_conversation()
    for number in range(4):
        history.add_message(conversation.id, "user" if number % 2 == 0 else "assistant", f"turn {number}")
    assert history.delete_messages_after(conversation.id, 1) == 2
    regenerated = history.add_message(conversation.id, "user", "turn 2, edited")
    assert regenerated.position == 2
    assert [m.text for m in history.messages(conversation.id)] == ["turn 0", "turn 1", "turn 2, edited"]


def test_one_history_can_be_shared_between_threads(history: History) -> None:
    conversation = history.new_conversation()

    def append(name: str) -> None:
        for number in range(50):
            history.add_message(conversation.id, "user", f"{name} {number}")

    threads = [threading.Thread(target=append, args=(f"thread{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [m.position for m in history.messages(conversation.id)] == list(range(200))


# --- search ---

def test_search_finds_words_in_messages_and_titles(history: History) -> None:
    astronomy = history.new_conversation("Telescopes for beginners")
    history.add_message(astronomy.id, "user", "Which eyepiece shows Saturn's rings best?")
    cooking = history.new_conversation("Dinner")
    history.add_message(cooking.id, "assistant", "Roast the peppers until the skins blister.")

    by_message = history.search("saturn rings")
    assert [(c.id, snippet) for c, snippet in by_message] == [
        (astronomy.id, "Which eyepiece shows **Saturn**'s **rings** best?")]
    assert [c.id for c, _ in history.search("telescope")] == [astronomy.id]   # title, stemmed
    assert [c.id for c, _ in history.search("pepp")] == [cooking.id]          # prefix
    assert history.search("saturn peppers") == []                             # every word, one message


def test_search_takes_any_text_without_query_syntax_errors(history: History) -> None:
    conversation = history.new_conversation()
    history.add_message(conversation.id, "user", "don't use NEAR(a b) or \"quotes\"")
    for query in ['"', "(", "NEAR(", "*", "AND", "-x", "don't", "", "   ", "a:b", "^"]:
        history.search(query)
    assert [c.id for c, _ in history.search("don't")] == [conversation.id]
    assert [c.id for c, _ in history.search('"quotes"')] == [conversation.id]


def test_the_search_index_follows_edits_renames_and_deletes(history: History) -> None:
    conversation = history.new_conversation("Giraffes")
    message = history.add_message(conversation.id, "assistant", "zebras", status="stopped")
    history.update_message(message.id, text="okapis")
    assert history.search("zebras") == []
    assert [c.id for c, _ in history.search("okapis")] == [conversation.id]
    history.rename(conversation.id, "Antelopes")
    assert history.search("giraffes") == []
    assert [c.id for c, _ in history.search("antelopes")] == [conversation.id]
    history.delete(conversation.id)
    assert history.search("okapis") == [] and history.search("antelopes") == []
    assert_sound(history.path)


# --- images ---

def test_an_image_is_stored_by_content_and_survives_deleting_the_original(
        history: History, tmp_path: Path) -> None:
    original = make_png(tmp_path / "holiday.png", size=(64, 48))
    original_bytes = original.read_bytes()
    image = history.add_image(original)
    original.unlink()
    stored = history.image_path(image.id)
    assert stored.read_bytes() == original_bytes
    assert stored.relative_to(history.images_dir).as_posix() == f"{image.id[:2]}/{image.id}.png"
    assert (image.name, image.format, image.mime, image.width, image.height, image.bytes) == (
        "holiday.png", "PNG", "image/png", 64, 48, len(original_bytes))


def test_the_same_image_added_twice_is_stored_once(history: History, tmp_path: Path) -> None:
    first = history.add_image(make_png(tmp_path / "a.png"))
    second = history.add_image((tmp_path / "a.png").read_bytes(), name="copy.png")
    other = history.add_image(make_png(tmp_path / "b.png", color="blue"))
    assert second == first and other.id != first.id
    assert count_rows(history.path, "images") == 2
    stored_files = [p for p in history.images_dir.rglob("*") if p.is_file()]
    assert sorted(stored_files) == sorted([history.image_path(first.id), history.image_path(other.id)])


def test_a_jpeg_gets_a_jpg_extension_and_its_mime_type(history: History, tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), "green").save(tmp_path / "photo.jpeg", "JPEG")
    image = history.add_image(tmp_path / "photo.jpeg")
    assert image.relative_path.endswith(".jpg") and image.mime == "image/jpeg"


def test_a_file_that_is_not_an_image_is_a_history_error(history: History, tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(HistoryError, match="notes.png: not an image"):
        history.add_image(tmp_path / "notes.png")
    with pytest.raises(HistoryError, match="no such file"):
        history.add_image(tmp_path / "missing.png")
    assert not history.images_dir.exists() or not any(history.images_dir.rglob("*.*"))


def test_conversation_and_message_images_are_linked(history: History, tmp_path: Path) -> None:
    image = history.add_image(make_png(tmp_path / "chart.png"))
    conversation = history.set_conversation_image(history.new_conversation().id, image.id)
    message = history.add_message(conversation.id, "user", "explain", image_id=image.id)
    assert conversation.image_id == message.image_id == image.id
    with pytest.raises(HistoryError, match="no image"):
        history.add_message(conversation.id, "user", "explain", image_id="f" * 64)
    assert history.set_conversation_image(conversation.id, None).image_id is None


# --- opening, pragmas and migrations ---

def test_opening_a_file_that_is_not_a_database_is_a_one_line_history_error(tmp_path: Path) -> None:
    garbage = tmp_path / "history.sqlite3"
    garbage.write_bytes(b"these are not the bytes of a database " * 200)
    with pytest.raises(HistoryError) as raised:
        History(garbage)
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"{garbage}: not a usable history database")
    assert garbage.read_bytes() == b"these are not the bytes of a database " * 200


def test_opening_a_directory_is_a_history_error(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="is a directory"):
        History(tmp_path)


def test_a_database_from_a_newer_lva_is_refused(tmp_path: Path) -> None:
    database = tmp_path / "history.sqlite3"
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(HistoryError, match="written by a newer lva"):
        History(database)


def test_the_database_is_in_wal_mode_with_its_schema_version(history: History) -> None:
    with sqlite3.connect(history.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert schema_version(db) == len(MIGRATIONS)


def test_a_write_waits_for_another_processes_transaction_instead_of_failing(history: History) -> None:
    conversation = history.new_conversation()
    other = sqlite3.connect(history.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")            # holds the write lock, as a second lva writing would
    threading.Timer(0.5, other.commit).start()
    started = time.monotonic()
    history.add_message(conversation.id, "user", "after you")
    assert time.monotonic() - started >= 0.4
    other.close()


def test_a_version_0_database_from_an_old_script_is_upgraded(tmp_path: Path) -> None:
    database = tmp_path / "history.sqlite3"
    with sqlite3.connect(database) as db:       # what a pre-versioning script left behind
        db.executescript("CREATE TABLE notes (text TEXT); INSERT INTO notes VALUES ('keep me');")
        assert schema_version(db) == 0
    with History(database) as history:
        history.add_message(history.new_conversation("upgraded").id, "user", "works")
    with sqlite3.connect(database) as db:
        assert schema_version(db) == len(MIGRATIONS)
        assert db.execute("SELECT text FROM notes").fetchall() == [("keep me",)]
    with History(database) as history:          # reopening: no migration re-runs (CREATE TABLE would fail)
        assert [c.title for c in history.list_conversations()] == ["upgraded"]


def test_a_new_migration_runs_once_on_existing_data(tmp_path: Path) -> None:
    database = tmp_path / "history.sqlite3"
    with History(database) as history:
        history.new_conversation("before the upgrade")
    upgrade = MIGRATIONS + ["ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;"
                            " UPDATE conversations SET pinned = 1;"]
    db = sqlite3.connect(database, isolation_level=None)
    assert migrate(db, upgrade) == len(MIGRATIONS) + 1
    db.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES ('after', 'now', 'now')")
    assert migrate(db, upgrade) == len(MIGRATIONS) + 1     # nothing re-runs: no duplicate column, no UPDATE
    assert db.execute("SELECT title, pinned FROM conversations ORDER BY id").fetchall() == [
        ("before the upgrade", 1), ("after", 0)]
    db.close()


def test_a_failing_migration_leaves_the_database_at_its_previous_version(tmp_path: Path) -> None:
    database = tmp_path / "history.sqlite3"
    History(database).close()
    db = sqlite3.connect(database, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        migrate(db, MIGRATIONS + ["CREATE TABLE half_done (x INTEGER); THIS IS NOT SQL;"])
    assert schema_version(db) == len(MIGRATIONS)
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchall() == []
    db.close()


# --- real processes: SIGKILL mid-write, and two writers at once ---

STREAMING_WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from assistant.history import History

history = History(sys.argv[2])
conversation = history.new_conversation(title="killed mid-answer")
while True:
    question = history.add_message(conversation.id, "user", "Why is the sky blue? " * 20)
    print("message", question.id, flush=True)
    answer = history.add_message(conversation.id, "assistant", "", status="stopped")
    print("message", answer.id, flush=True)
    text = ""
    for count in range(1, 40):
        text += f"word{count} "
        history.update_message(answer.id, text=text, completion_tokens=count)
        print("update", answer.id, count, flush=True)
    history.update_message(answer.id, status="complete")
"""

APPENDING_WRITER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from assistant.history import History

database, start, count, conversation = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
while not start.exists():       # both writers begin together, opening the database at the same moment
    time.sleep(0.001)
history = History(database)
conversation_id = int(conversation) if conversation != "new" else history.new_conversation(str(os.getpid())).id
for number in range(count):
    print(history.add_message(conversation_id, "user", f"message {number}").id, flush=True)
    time.sleep(0.001)           # a gap, as between streamed chunks, so the two writers take turns
"""


def start_python(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, str(REPO_ROOT), *map(str, args)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_during_writes_keeps_every_committed_message_and_a_sound_database(tmp_path: Path) -> None:
    database = tmp_path / "history.sqlite3"
    reported: list[list[str]] = []
    for kill_after_lines in (7, 150, 600):      # three kills, each landing somewhere else in the loop
        writer = start_python(STREAMING_WRITER, database)
        lines = [writer.stdout.readline() for _ in range(kill_after_lines)]
        writer.send_signal(signal.SIGKILL)
        rest, errors = writer.communicate(timeout=60)
        assert writer.returncode == -signal.SIGKILL, errors
        lines += rest.splitlines(keepends=True)
        reported += [line.split() for line in lines if line.endswith("\n")]   # a cut-off line proves nothing
        assert_sound(database)

    with History(database) as history:
        conversations = history.list_conversations()
        messages = {m.id: m for c in conversations for m in history.messages(c.id)}
    assert len(conversations) == 3
    assert all(int(line[1]) in messages for line in reported if line[0] == "message")
    for _, message_id, count in (line for line in reported if line[0] == "update"):
        answer = messages[int(message_id)]      # at least what was reported, maybe one update more
        assert answer.completion_tokens >= int(count)
        assert answer.text.startswith(" ".join(f"word{n}" for n in range(1, int(count) + 1)))
    assert any(m.status == "stopped" and m.text for m in messages.values())   # a partial answer, kept


def run_two_writers(database: Path, tmp_path: Path, conversations: tuple[str, str], count: int) -> list[int]:
    """Start two writer processes, release them together, and return the message ids they reported."""
    start = tmp_path / "start"
    writers = [start_python(APPENDING_WRITER, database, start, count, conversation) for conversation in conversations]
    time.sleep(0.5)                             # let both import and reach the starting line
    start.touch()
    reported = []
    for writer in writers:
        output, errors = writer.communicate(timeout=120)
        assert writer.returncode == 0, errors
        reported += [int(line) for line in output.split()]
    return reported


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    database = tmp_path / "history.sqlite3"     # not created yet: both writers create and migrate it at once
    reported = run_two_writers(database, tmp_path, ("new", "new"), count=200)
    assert len(set(reported)) == 400
    with History(database) as history:
        conversations = history.list_conversations()
        assert len(conversations) == 2
        stored = [history.messages(c.id) for c in conversations]
    assert sorted(m.id for messages in stored for m in messages) == sorted(reported)
    for messages in stored:
        assert [m.position for m in messages] == list(range(200))
    writer_of = {m.id: m.conversation_id for messages in stored for m in messages}
    turns = [writer_of[message_id] for message_id in sorted(writer_of)]
    assert sum(a != b for a, b in itertools.pairwise(turns)) > 1     # the writes really did overlap
    assert_sound(database)


def test_two_processes_appending_to_one_conversation_get_distinct_positions(tmp_path: Path) -> None:
    database = tmp_path / "history.sqlite3"
    with History(database) as history:
        conversation_id = history.new_conversation("shared").id
    reported = run_two_writers(database, tmp_path, (str(conversation_id),) * 2, count=200)
    with History(database) as history:
        messages = history.messages(conversation_id)
    assert sorted(m.id for m in messages) == sorted(reported)
    assert [m.position for m in messages] == list(range(400))
