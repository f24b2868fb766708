"""Durable conversation history: one SQLite file, and the images copied beside it by content.

Layout (under `data_dir()`, i.e. $LVA_HOME when set):
    history.sqlite3                 conversations, messages, images, full-text index (schema: migrations.py)
    images/ab/ab12…ef.png           each image once, named by the sha256 of its bytes; deleting the last
                                    conversation that shows an image deletes its copy

Why it survives crashes:
- WAL journal with `synchronous=NORMAL`. A commit is in the write-ahead log before `commit()` returns, so a
  process killed at any moment (SIGKILL mid-answer) loses nothing it committed and never corrupts the file.
  Only a power cut or OS crash can lose the last few commits, and even then the file stays consistent.
  FULL would fsync on every commit, and we commit on every streamed chunk of an answer: not worth it.
- Every write is one transaction, begun with BEGIN IMMEDIATE (see `_write`), and a busy timeout lets a
  second process wait for the lock instead of failing, so two `lva` windows can share one history.
- A streamed answer is inserted first with status 'stopped' and updated as text arrives, then marked
  'complete'. If the process dies, the partial answer is there, marked as stopped.
- Images are written to a temporary file in the target folder, fsynced, then renamed into place, so a
  stored image is either whole or absent.

Export and import (Markdown, JSON) are in export.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from PIL import Image

from assistant.history.migrations import MIGRATIONS, migrate, schema_version
from assistant.store import data_dir
from models.atomic_write import write_atomically
from models.errors import LvaError

Role = Literal["system", "user", "assistant"]
Status = Literal["complete", "stopped", "error"]
ROLES: tuple[str, ...] = get_args(Role)
STATUSES: tuple[str, ...] = get_args(Status)

BUSY_TIMEOUT_S = 10.0       # how long a write waits for another process's transaction to finish
SNIPPET_MARKS = ("**", "**")  # around each matched word in `search` snippets: Markdown bold
# SQL condition: an image that no conversation and no message refers to
_UNUSED_IMAGE = ("id NOT IN (SELECT image_id FROM messages WHERE image_id IS NOT NULL)"
                 " AND id NOT IN (SELECT image_id FROM conversations WHERE image_id IS NOT NULL)")
# File extension for a Pillow format, where the lower-cased format name is not the usual one.
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg"}


class HistoryError(LvaError):
    """Something the user caused (an unknown id, a bad import, a file that is not a history); one line."""


# The kept records (rows), named apart from the chat engine's live `Conversation` and `Turn`, which
# assistant/chat/saved.py turns them into and back.
@dataclass(frozen=True)
class StoredConversation:
    id: int
    title: str | None
    created_at: datetime
    updated_at: datetime        # the last time a message was added or changed; lists sort on it
    system_prompt: str | None
    model: str | None
    sampling: dict[str, Any] | None
    image_id: str | None        # the image the conversation is about, if any


@dataclass(frozen=True)
class StoredMessage:
    id: int
    conversation_id: int
    position: int               # 0, 1, 2, ... within the conversation
    role: Role
    text: str
    image_id: str | None        # the image attached at this turn
    created_at: datetime
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float | None
    model: str | None
    sampling: dict[str, Any] | None
    status: Status              # 'stopped': a partial answer, kept; 'error': generation failed


@dataclass(frozen=True)
class StoredImage:
    id: str                     # sha256 hex of the file bytes
    name: str | None            # the original file name
    format: str                 # Pillow's name: PNG, JPEG, ...
    mime: str | None
    width: int
    height: int
    bytes: int
    relative_path: str          # under `History.images_dir`; `History.image_path(id)` gives the full path
    created_at: datetime


class History:
    """The conversation store. Cheap to open; one may be shared between threads (each call is atomic)."""

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 images_dir: str | os.PathLike[str] | None = None) -> None:
        """Open (creating and migrating as needed) the history at `path`, default `data_dir()/history.sqlite3`.

        Images live in `images_dir`, default the `images` folder beside the database.
        """
        self.path = Path(path) if path is not None else data_dir() / "history.sqlite3"
        self.images_dir = Path(images_dir) if images_dir is not None else self.path.parent / "images"
        self._lock = threading.RLock()
        self._db = _open(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- conversations ---

    def new_conversation(self, title: str | None = None, system_prompt: str | None = None,
                         model: str | None = None, sampling: Mapping[str, Any] | None = None) -> StoredConversation:
        now = stored_time()
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO conversations (title, created_at, updated_at, system_prompt, model, sampling)"
                " VALUES (?, ?, ?, ?, ?, ?)", (title, now, now, system_prompt, model, _json(sampling)))
            return _conversation_in(db, cursor.lastrowid)

    def conversation(self, conversation_id: int) -> StoredConversation:
        with self._read() as db:
            return _conversation_in(db, conversation_id)

    def list_conversations(self, limit: int | None = None) -> list[StoredConversation]:
        """Most recently active first."""
        with self._read() as db:
            rows = db.execute(f"SELECT {_columns(StoredConversation)} FROM conversations"
                              " ORDER BY updated_at DESC, id DESC LIMIT ?",
                              (-1 if limit is None else limit,))     # LIMIT -1: no limit
            return [_from_row(StoredConversation, row) for row in rows]

    def last_conversation(self) -> StoredConversation | None:
        """The one to resume on start-up, if there is any."""
        found = self.list_conversations(limit=1)
        return found[0] if found else None

    def rename(self, conversation_id: int, title: str | None) -> StoredConversation:
        with self._write() as db:
            _conversation_in(db, conversation_id)
            db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))
            return _conversation_in(db, conversation_id)

    def set_settings(self, conversation_id: int, system_prompt: str | None, sampling: Mapping[str, Any] | None
                     ) -> StoredConversation:
        """The conversation's system prompt and sampling, as its next turns will use them."""
        with self._write() as db:
            _conversation_in(db, conversation_id)
            db.execute("UPDATE conversations SET system_prompt = ?, sampling = ? WHERE id = ?",
                       (system_prompt, _json(sampling), conversation_id))
            return _conversation_in(db, conversation_id)

    def set_conversation_image(self, conversation_id: int, image_id: str | None) -> StoredConversation:
        with self._write() as db:
            _conversation_in(db, conversation_id)
            if image_id is not None:
                _image_in(db, image_id)
            db.execute("UPDATE conversations SET image_id = ? WHERE id = ?", (image_id, conversation_id))
            return _conversation_in(db, conversation_id)

    def delete(self, conversation_id: int) -> None:
        """Delete a conversation, its messages, and the stored images nothing else refers to: a deleted
        conversation leaves no copy of its pictures behind. An image another conversation shows stays."""
        with self._write() as db:
            _conversation_in(db, conversation_id)
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            unused = db.execute(f"SELECT id, relative_path FROM images WHERE {_UNUSED_IMAGE}").fetchall()
            db.execute(f"DELETE FROM images WHERE {_UNUSED_IMAGE}")
        if unused:
            self._remove_image_files(unused)

    # --- messages ---

    def add_message(self, conversation_id: int, role: Role, text: str, image_id: str | None = None,
                    prompt_tokens: int | None = None, completion_tokens: int | None = None,
                    seconds: float | None = None, model: str | None = None,
                    sampling: Mapping[str, Any] | None = None, status: Status = "complete") -> StoredMessage:
        """Append a turn at the next position.

        For a streamed answer, add it with status 'stopped' and `update_message` it as text arrives:
        whatever was committed survives a crash, marked as a partial answer.
        """
        _check_choice("role", role, ROLES)
        _check_choice("status", status, STATUSES)
        now = stored_time()
        with self._write() as db:
            _conversation_in(db, conversation_id)
            if image_id is not None:
                _image_in(db, image_id)
            # Safe without a race: BEGIN IMMEDIATE holds the write lock until this transaction commits.
            position = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM messages"
                                  " WHERE conversation_id = ?", (conversation_id,)).fetchone()[0]
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, position, role, text, image_id, created_at,"
                " prompt_tokens, completion_tokens, seconds, model, sampling, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, position, role, text, image_id, now, prompt_tokens, completion_tokens,
                 seconds, model, _json(sampling), status))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
            return _message_in(db, cursor.lastrowid)

    def update_message(self, message_id: int, *, text: str | None = None, status: Status | None = None,
                       prompt_tokens: int | None = None, completion_tokens: int | None = None,
                       seconds: float | None = None) -> StoredMessage:
        """Change the given fields of a message (None leaves a field as it is); `text` is the whole text.

        Called while streaming, so it is one small transaction and no fsync (see the module docstring).
        """
        if status is not None:
            _check_choice("status", status, STATUSES)
        changes = {column: value for column, value in (
            ("text", text), ("status", status), ("prompt_tokens", prompt_tokens),
            ("completion_tokens", completion_tokens), ("seconds", seconds)) if value is not None}
        with self._write() as db:
            message = _message_in(db, message_id)
            if changes:
                assignments = ", ".join(f"{column} = ?" for column in changes)  # our own column names
                db.execute(f"UPDATE messages SET {assignments} WHERE id = ?", (*changes.values(), message_id))
                db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?",
                           (stored_time(), message.conversation_id))
            return _message_in(db, message_id)

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        """The turns in order."""
        with self._read() as db:
            _conversation_in(db, conversation_id)
            return _messages_in(db, conversation_id)

    def delete_messages_after(self, conversation_id: int, position: int) -> int:
        """Drop every message after `position` (to regenerate or edit a turn); return how many went."""
        with self._write() as db:
            _conversation_in(db, conversation_id)
            cursor = db.execute("DELETE FROM messages WHERE conversation_id = ? AND position > ?",
                                (conversation_id, position))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (stored_time(), conversation_id))
            return cursor.rowcount

    # --- images ---

    def add_image(self, source: str | os.PathLike[str] | bytes, name: str | None = None) -> StoredImage:
        """Copy an image into the store, named by the sha256 of its bytes.

        The history then keeps working after the original is moved or deleted, and the same picture
        attached twice is stored once (the first name given is kept).
        """
        data, name = _read_image_source(source, name)
        sha = hashlib.sha256(data).hexdigest()
        image_format, mime, (width, height) = describe_image(data, name)
        relative_path = f"{sha[:2]}/{sha}{EXTENSIONS.get(image_format, '.' + image_format.lower())}"
        target = self.images_dir / relative_path
        with self._write() as db:   # the lock orders this against another process deleting the same image
            if not target.is_file():    # written atomically, so a file that is there is whole
                with write_atomically(target) as file:   # before the row, so a row never points at a missing file
                    file.write(data)
            db.execute("INSERT OR IGNORE INTO images (id, name, format, mime, width, height, bytes,"
                       " relative_path, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (sha, name, image_format, mime, width, height, len(data), relative_path, stored_time()))
            return _image_in(db, sha)

    def image(self, image_id: str) -> StoredImage:
        with self._read() as db:
            return _image_in(db, image_id)

    def image_path(self, image_id: str) -> Path:
        return self.images_dir / self.image(image_id).relative_path

    # --- search ---

    def search(self, query: str, limit: int = 50) -> list[tuple[StoredConversation, str]]:
        """Conversations whose title, or one of whose messages, contains every word of `query`.

        Words match as prefixes, after stemming ("run" finds "running"); FTS5 query syntax is not exposed,
        so any text is a valid query. Title matches come first, then messages by relevance; each
        conversation once, with a snippet of its best match, matched words between `SNIPPET_MARKS`.
        """
        match = _fts_query(query)
        if not match:
            return []
        start, end = SNIPPET_MARKS
        with self._read() as db:
            title_hits = db.execute(
                "SELECT rowid, snippet(conversations_fts, 0, ?, ?, '…', 12) FROM conversations_fts"
                " WHERE conversations_fts MATCH ? ORDER BY rank", (start, end, match)).fetchall()
            message_hits = db.execute(
                "SELECT messages.conversation_id, snippet(messages_fts, 0, ?, ?, '…', 12)"
                " FROM messages_fts JOIN messages ON messages.id = messages_fts.rowid"
                " WHERE messages_fts MATCH ? ORDER BY rank", (start, end, match)).fetchall()
            snippets: dict[int, str] = {}
            for conversation_id, snippet in [*title_hits, *message_hits]:
                snippets.setdefault(conversation_id, snippet)
            return [(_conversation_in(db, conversation_id), snippet)
                    for conversation_id, snippet in list(snippets.items())[:limit]]

    # --- whole conversations, for export.py ---

    def snapshot(self, conversation_id: int) -> tuple[StoredConversation, list[StoredMessage], dict[str, StoredImage]]:
        """A conversation, its messages and the images they show, read at one moment."""
        with self._read() as db:
            conversation = _conversation_in(db, conversation_id)
            messages = _messages_in(db, conversation_id)
            return conversation, messages, _images_in(db, [conversation.image_id, *(m.image_id for m in messages)])

    def has_image_file(self, image_id: str) -> bool:
        """Whether the store holds image `image_id`, its file included."""
        with self._read() as db:
            known = db.execute("SELECT relative_path FROM images WHERE id = ?", (image_id,)).fetchone()
        return known is not None and (self.images_dir / known[0]).is_file()

    def restore(self, record: Mapping[str, Any]) -> StoredConversation:
        """Add a conversation and its messages as they were (timestamps kept), in one transaction.

        `record` is an export checked by export.py, times already in the stored form; the images it names
        must be in the store already.
        """
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO conversations (title, created_at, updated_at, system_prompt, model, sampling,"
                " image_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record["title"], record["created_at"], record["updated_at"], record["system_prompt"],
                 record["model"], _json(record["sampling"]), record["image"]))
            for position, message in enumerate(record["messages"]):
                db.execute(
                    "INSERT INTO messages (conversation_id, position, role, text, image_id, created_at,"
                    " prompt_tokens, completion_tokens, seconds, model, sampling, status)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cursor.lastrowid, position, message["role"], message["text"], message["image"],
                     message["created_at"], message["prompt_tokens"], message["completion_tokens"],
                     message["seconds"], message["model"], _json(message["sampling"]), message["status"]))
            return _conversation_in(db, cursor.lastrowid)

    # --- internals ---

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises.

        BEGIN IMMEDIATE takes the write lock up front. A plain BEGIN would take it at the first write, and
        if another process committed in between, SQLite fails that write at once (SQLITE_BUSY) instead of
        waiting out the busy timeout.
        """
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs; in WAL mode readers and the writer never wait on each other."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            yield self._db

    def _remove_image_files(self, images: list[tuple[str, str]]) -> None:
        """Delete the files of images whose rows are gone, after the commit that removed the rows (a row never
        points at a missing file). Under the write lock, so an `add_image` of the same picture in another
        process either came first (its row is back, the file stays) or comes after (it writes the file again).
        A crash in between leaves only a file no row names."""
        with self._write() as db:
            for sha, relative_path in images:
                if not db.execute("SELECT 1 FROM images WHERE id = ?", (sha,)).fetchone():
                    (self.images_dir / relative_path).unlink(missing_ok=True)

# --- opening ---

# NORMAL: in WAL mode this is still safe when the process dies (see the module docstring); only an OS crash
# may lose the last commits. foreign_keys is off by default in SQLite and is per connection: without it,
# ON DELETE CASCADE does nothing.
PRAGMAS = ("PRAGMA synchronous = NORMAL", "PRAGMA foreign_keys = ON")


def _open(path: Path) -> sqlite3.Connection:
    """Connect, configure and migrate; a file that cannot be our database is a one-line HistoryError."""
    if path.is_dir():
        raise HistoryError(f"{path}: is a directory, not a history database")
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; `_write` and `_read` begin them explicitly.
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    try:
        _use_wal(db)
        for pragma in PRAGMAS:
            db.execute(pragma)
        version = schema_version(db)
        if version > len(MIGRATIONS):
            raise HistoryError(f"{path}: written by a newer lva (schema version {version}; "
                               f"this one knows up to {len(MIGRATIONS)})")
        migrate(db)
    except sqlite3.Error as error:
        db.close()
        raise HistoryError(f"{path}: not a usable history database ({error})") from None
    except HistoryError:
        db.close()
        raise
    return db


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch to the WAL journal: readers never block the writer, and a killed writer cannot corrupt the file.

    The switch is stored in the file, so it happens once. When two processes make it on a new database at
    the same moment, SQLite answers BUSY at once instead of using the busy timeout, so we retry ourselves.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# --- rows to dataclasses ---

T = TypeVar("T", StoredConversation, StoredMessage, StoredImage)


def _columns(cls: type) -> str:
    """The SELECT list for a dataclass: its fields are named after the columns."""
    return ", ".join(field.name for field in fields(cls))


def _from_row(cls: type[T], row: sqlite3.Row) -> T:
    values = dict(row)
    for key in ("created_at", "updated_at"):
        if key in values:
            values[key] = datetime.fromisoformat(values[key])
    if values.get("sampling") is not None:
        values["sampling"] = json.loads(values["sampling"])
    return cls(**values)


def _conversation_in(db: sqlite3.Connection, conversation_id: int | None) -> StoredConversation:
    row = db.execute(f"SELECT {_columns(StoredConversation)} FROM conversations WHERE id = ?",
                     (conversation_id,)).fetchone()
    if row is None:
        raise HistoryError(f"no conversation with id {conversation_id}")
    return _from_row(StoredConversation, row)


def _message_in(db: sqlite3.Connection, message_id: int | None) -> StoredMessage:
    row = db.execute(f"SELECT {_columns(StoredMessage)} FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        raise HistoryError(f"no message with id {message_id}")
    return _from_row(StoredMessage, row)


def _messages_in(db: sqlite3.Connection, conversation_id: int) -> list[StoredMessage]:
    rows = db.execute(f"SELECT {_columns(StoredMessage)} FROM messages WHERE conversation_id = ? ORDER BY position",
                      (conversation_id,))
    return [_from_row(StoredMessage, row) for row in rows]


def _image_in(db: sqlite3.Connection, image_id: str) -> StoredImage:
    row = db.execute(f"SELECT {_columns(StoredImage)} FROM images WHERE id = ?", (image_id,)).fetchone()
    if row is None:
        raise HistoryError(f"no image with id {image_id}")
    return _from_row(StoredImage, row)


def _images_in(db: sqlite3.Connection, image_ids: list[str | None]) -> dict[str, StoredImage]:
    """The distinct images among `image_ids` (Nones skipped), in first-use order."""
    return {image_id: _image_in(db, image_id) for image_id in dict.fromkeys(image_ids) if image_id}


# --- small helpers ---

def stored_time(moment: datetime | None = None) -> str:
    """A time as the history stores it (now, when not given): UTC, ISO 8601, fixed width with microseconds, so
    timestamps sort correctly as text. A time without a zone is taken as UTC."""
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(dict(value), sort_keys=True)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise HistoryError(f"{what} must be one of {', '.join(choices)}, not {value!r}")


def _fts_query(text: str) -> str:
    """Each word of the user's text as a quoted prefix term: FTS5 ANDs them, and no input is a syntax error."""
    return " ".join('"' + word.replace('"', '""') + '"*' for word in text.split())


# --- image files ---

def _read_image_source(source: str | os.PathLike[str] | bytes, name: str | None) -> tuple[bytes, str | None]:
    if isinstance(source, bytes):
        return source, name
    path = Path(source)
    try:
        return path.read_bytes(), name or path.name
    except FileNotFoundError:
        raise HistoryError(f"{path}: no such file") from None
    except OSError as error:
        raise HistoryError(f"{path}: cannot read ({error.strerror})") from None


def describe_image(data: bytes, name: str | None) -> tuple[str, str | None, tuple[int, int]]:
    """Pillow's format name, MIME type and (width, height), read from the header."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format or "unknown", image.get_format_mimetype(), image.size
    except (OSError, ValueError, Image.DecompressionBombError):   # UnidentifiedImageError is an OSError
        raise HistoryError(f"{name or 'image'}: not an image Pillow can read") from None
