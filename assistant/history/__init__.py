"""Durable conversation history: SQLite (WAL, versioned migrations, full-text search) plus stored images.

Usage: `with History() as history: conversation = history.new_conversation(...)`. See store.py; export.py
writes a conversation as Markdown or JSON and imports the JSON.
"""

from assistant.history.store import (History, HistoryError, Role, Status, StoredConversation, StoredImage,
                                     StoredMessage)

__all__ = ["History", "HistoryError", "Role", "Status", "StoredConversation", "StoredImage", "StoredMessage"]
