"""The history schema, as an append-only list of SQL scripts numbered by `PRAGMA user_version`.

A database at version N has had scripts 1..N applied. To change the schema, append a script; never edit
one that has shipped, because databases in the wild have already run it. `migrate` applies the missing
scripts in one transaction, so a crash or a bad script leaves the database exactly at its old version.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence

# 1: everything. Timestamps are ISO 8601 UTC text with microseconds (fixed width, so they sort as text);
# `sampling` columns hold a JSON object of the sampler settings; image ids are sha256 hex of the file bytes.
# The two FTS5 tables are "external content" indexes: they store only the index, read the text from
# `messages` / `conversations`, and the triggers keep them in step with every insert, update and delete
# (cascaded deletes fire triggers too).
SCHEMA_1 = """
CREATE TABLE images (
    id            TEXT PRIMARY KEY,            -- sha256 hex of the file bytes
    name          TEXT,                        -- the original file name, for display and export
    format        TEXT NOT NULL,               -- Pillow's name for it: PNG, JPEG, WEBP, ...
    mime          TEXT,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    relative_path TEXT NOT NULL,               -- under the images folder: "ab/ab12....png"
    created_at    TEXT NOT NULL
);

CREATE TABLE conversations (
    id            INTEGER PRIMARY KEY,
    title         TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    system_prompt TEXT,
    model         TEXT,
    sampling      TEXT CHECK (sampling IS NULL OR json_valid(sampling)),
    image_id      TEXT REFERENCES images(id)   -- the image the conversation is about, if any
);
CREATE INDEX conversations_by_updated_at ON conversations(updated_at);

CREATE TABLE messages (
    id                INTEGER PRIMARY KEY,
    conversation_id   INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position          INTEGER NOT NULL,        -- 0, 1, 2, ... within the conversation
    role              TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    text              TEXT NOT NULL,
    image_id          TEXT REFERENCES images(id),  -- the image attached at this turn
    created_at        TEXT NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    seconds           REAL,
    model             TEXT,
    sampling          TEXT CHECK (sampling IS NULL OR json_valid(sampling)),
    status            TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'stopped', 'error')),
    UNIQUE (conversation_id, position)
);
CREATE INDEX messages_by_image ON messages(image_id);

CREATE VIRTUAL TABLE messages_fts USING fts5(
    text, content='messages', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
END;

CREATE VIRTUAL TABLE conversations_fts USING fts5(
    title, content='conversations', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER conversations_fts_insert AFTER INSERT ON conversations BEGIN
    INSERT INTO conversations_fts(rowid, title) VALUES (new.id, new.title);
END;
CREATE TRIGGER conversations_fts_delete AFTER DELETE ON conversations BEGIN
    INSERT INTO conversations_fts(conversations_fts, rowid, title) VALUES ('delete', old.id, old.title);
END;
CREATE TRIGGER conversations_fts_update AFTER UPDATE OF title ON conversations BEGIN
    INSERT INTO conversations_fts(conversations_fts, rowid, title) VALUES ('delete', old.id, old.title);
    INSERT INTO conversations_fts(rowid, title) VALUES (new.id, new.title);
END;
"""

MIGRATIONS: list[str] = [SCHEMA_1]


def schema_version(connection: sqlite3.Connection) -> int:
    return connection.execute("PRAGMA user_version").fetchone()[0]


def migrate(connection: sqlite3.Connection, migrations: Sequence[str] = MIGRATIONS) -> int:
    """Apply the scripts this database has not run yet, all in one transaction; return the new version.

    BEGIN IMMEDIATE takes the write lock before the version is read, so when two processes open a new
    database at once, the second waits and then finds nothing left to do. A database newer than
    `migrations` is left alone: the caller decides whether that is an error.
    """
    if schema_version(connection) >= len(migrations):
        return schema_version(connection)
    with connection:
        connection.execute("BEGIN IMMEDIATE")
        version = schema_version(connection)
        for number, script in enumerate(migrations[version:], start=version + 1):
            for statement in _statements(script):
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number}")
    return schema_version(connection)


def _statements(script: str) -> Iterator[str]:
    """Split a script into single statements (`execute` takes one; `executescript` would commit first).

    `sqlite3.complete_statement` knows about string literals, comments and trigger bodies, so a `;`
    inside any of them does not end the statement.
    """
    statement = ""
    for piece in script.split(";"):
        statement += piece + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \t\n;"):
                yield statement
            statement = ""
