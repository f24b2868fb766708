"""`lva` with two bugs planted in it, to see what a bug looks like from outside (tests/test_errors.py).

    python -m tests.planted_bug ask --model M "trigger the planted bug"
    python -m tests.planted_bug serve --model tiny-a

In the chat engine: an answer to a message containing `TRIGGER` writes its first piece and then raises a
RuntimeError, as a bug in lva would (every other message is answered as usual). In the server: GET /api/ps
raises one. Nothing else changes: the real command line, model, engine and server run.
"""

from __future__ import annotations

from itertools import islice

from assistant.chat.engine import ChatEngine
from assistant.cli import main
from assistant.server import ollama_api

TRIGGER = "trigger the planted bug"
MESSAGE = "a bug planted by the test"
_answer = ChatEngine._answer


def _answer_with_a_bug(self, conversation, *args, **kwargs):
    pieces = _answer(self, conversation, *args, **kwargs)
    if TRIGGER not in conversation.turns[-1].text:
        return pieces
    return _first_piece_then_a_bug(pieces)


def _first_piece_then_a_bug(pieces):
    try:
        yield from islice(pieces, 1)
    finally:
        pieces.close()          # as when the engine itself raises: the generators below end before the error
    raise RuntimeError(MESSAGE)


def _running_with_a_bug(worker):
    raise RuntimeError(MESSAGE)


ChatEngine._answer = _answer_with_a_bug
ollama_api.running = _running_with_a_bug

if __name__ == "__main__":
    raise SystemExit(main())
