"""`lva ask`: one question, the answer streamed to stdout, the exchange kept in the history."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from assistant.commands import common


def add_parser(commands) -> None:
    parser = commands.add_parser("ask", help="ask one question (about an image) and print the answer",
                                 description="Ask one question; the answer streams to stdout. "
                                             "Example: lva ask --image photo.jpg 'What is in this picture?'")
    parser.add_argument("prompt", help="the question; - reads it from stdin")
    parser.add_argument("--image", type=Path, help="an image to ask about")
    parser.add_argument("--system", help="a system prompt (a new conversation only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the answer and its figures")
    parser.add_argument("--continue", dest="continue_", action="store_true",
                        help="continue the last conversation in the history")
    parser.add_argument("--no-history", action="store_true", help="keep nothing in the history")
    common.add_model_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from assistant.chat import saved
    from assistant.chat.engine import ChatEngine, Conversation
    from assistant.history import History
    from assistant.images import load_image

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.image is not None:
        load_image(args.image)                               # a bad image fails before the model loads
    history = None if args.no_history else History()
    conversation_id = None
    if args.continue_ and history is not None:
        last = history.last_conversation()
        if last is not None:
            conversation_id, conversation = last.id, saved.load(history, last.id)
    if conversation_id is None:
        conversation = Conversation(system_prompt=args.system, sampling=common.sampling_from(args))
    model = common.load(args)
    engine = ChatEngine(model)
    replies: list = []
    pieces = engine.send(conversation, prompt, args.image, on_reply=replies.append)
    if history is not None:
        model_name = model.text_path.name
        if conversation_id is None:
            conversation_id = saved.start(history, conversation, model_name, title=prompt)
        saved.save_user_turn(history, conversation_id, conversation.turns[-1])
        pieces = saved.stream_answer(history, conversation_id, pieces, model_name, conversation.sampling, replies)
    text = ""
    for piece in pieces:
        text += piece
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    reply = replies[-1]
    if args.json:
        print(json.dumps({"response": text, "conversation_id": conversation_id, "prompt_tokens": reply.prompt_tokens,
                          "completion_tokens": reply.completion_tokens, "seconds": round(reply.seconds, 3),
                          "dropped_turns": reply.dropped_turns, "done_reason": reply.done_reason}))
    else:
        sys.stdout.write("\n")
    if args.verbose:
        print(f"lva: vision encoder runs: {model.images_encoded}", file=sys.stderr)
    if reply.done_reason == "length":
        print(f"lva: the answer was cut at --max-tokens {conversation.sampling.max_tokens}", file=sys.stderr)
    if reply.dropped_turns:
        print(f"lva: the {reply.dropped_turns} oldest turns were left out to fit the context", file=sys.stderr)
    model.close()
    return 0
