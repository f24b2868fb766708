"""Conversations to and from the history: what the engine holds, as the SQLite store keeps it.

An answer is written while it streams (created first, updated every `SAVE_EVERY_SECONDS`), so a kill
mid-answer keeps what was shown, marked as stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from assistant.chat.engine import Answer, Conversation, Reply, Sampling, Turn
from assistant.history import History

SAVE_EVERY_SECONDS = 0.5


def load(history: History, conversation_id: int) -> Conversation:
    """A stored conversation, ready for the next turn (its images are the store's copies)."""
    stored = history.conversation(conversation_id)
    turns = []
    for message in history.messages(conversation_id):
        if message.role == "system":
            continue
        image = history.image_path(message.image_id) if message.image_id else None
        turns.append(Turn(message.role, message.text, image=image, status=message.status, message_id=message.id))
    sampling = Sampling(**stored.sampling) if stored.sampling else Sampling()
    return Conversation(system_prompt=stored.system_prompt, turns=turns, sampling=sampling)


def image_names(history: History, conversation_id: int) -> dict[Path, str]:
    """The original file names of a conversation's images, by the path of the store's copy (named by hash)."""
    names = {}
    for message in history.messages(conversation_id):
        if message.image_id:
            stored = history.image(message.image_id)
            path = history.images_dir / stored.relative_path
            names[path] = stored.name or path.name
    return names


def start(history: History, conversation: Conversation, model_name: str, title: str) -> int:
    """A new stored conversation for an engine conversation; returns its id."""
    return history.new_conversation(title=title[:80], system_prompt=conversation.system_prompt, model=model_name,
                                    sampling=asdict(conversation.sampling)).id


def save_user_turn(history: History, conversation_id: int, turn: Turn) -> None:
    image_id = None
    if turn.image is not None:
        stored = history.add_image(turn.image)
        image_id = stored.id
        turn.image = history.image_path(stored.id)          # from now on the conversation uses the copy
        history.set_conversation_image(conversation_id, image_id)
    turn.message_id = history.add_message(conversation_id, "user", turn.text, image_id=image_id).id


def stream_answer(history: History, conversation_id: int, pieces: Iterator[str], model_name: str,
                  sampling: Sampling, replies: list[Reply]) -> Answer:
    """Pass the answer's pieces through, keeping the stored answer up to date; `replies` gets the Reply."""
    message = history.add_message(conversation_id, "assistant", "", model=model_name, sampling=asdict(sampling),
                                  status="stopped")
    text, saved_at = "", time.monotonic()
    try:
        for piece in pieces:
            text += piece
            yield piece
            if time.monotonic() - saved_at > SAVE_EVERY_SECONDS:
                history.update_message(message.id, text=text)
                saved_at = time.monotonic()
    finally:
        reply = replies[-1] if replies else Reply(text=text, status="stopped")
        history.update_message(message.id, text=text, status=reply.status,
                               completion_tokens=reply.completion_tokens, seconds=reply.seconds,
                               prompt_tokens=reply.prompt_tokens)


def rewind(history: History, conversation_id: int, turns_kept: int) -> None:
    """Forget the stored turns from `turns_kept` on (before a regenerate or an edit stores its new ones).

    Turn i of the engine is message position i: the system prompt lives on the conversation, not as a message.
    """
    history.delete_messages_after(conversation_id, turns_kept - 1)


def save_settings(history: History, conversation_id: int, conversation: Conversation) -> None:
    """Settings changed mid-conversation stay with it when it is reopened."""
    history.set_settings(conversation_id, conversation.system_prompt, asdict(conversation.sampling))
