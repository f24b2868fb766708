"""`lva history list|show|export|rm|search|rename|import`: the kept conversations."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(commands) -> None:
    parser = commands.add_parser("history", help="list, show, search, export or delete kept conversations",
                                 description="Examples: lva history list · lva history show 3 · "
                                             "lva history export 3 --format json > chat.json · lva history rm 3")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="conversations, newest first")
    show = actions.add_parser("show", help="one conversation, every turn")
    show.add_argument("id", type=int)
    search = actions.add_parser("search", help="conversations whose messages or titles contain the words")
    search.add_argument("query")
    export = actions.add_parser("export", help="a conversation as Markdown or our JSON, on stdout")
    export.add_argument("id", type=int)
    export.add_argument("--format", choices=("markdown", "json"), default="markdown")
    imported = actions.add_parser("import", help="a conversation exported as JSON")
    imported.add_argument("file", type=Path)
    rename = actions.add_parser("rename", help="give a conversation a title")
    rename.add_argument("id", type=int)
    rename.add_argument("title")
    remove = actions.add_parser("rm", help="delete conversations (their images stay while others use them)")
    remove.add_argument("ids", type=int, nargs="+")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from assistant.history import History
    from assistant.history.export import export_json, export_markdown, import_json

    history = History()
    try:
        if args.action == "list":
            conversations = history.list_conversations()
            if not conversations:
                print("no conversations yet; start one with: lva ask 'Hello'")
            for c in conversations:
                print(f"{c.id:>5}  {c.updated_at:%Y-%m-%d %H:%M}  {c.title or '(untitled)'}")
        elif args.action == "show":
            sys.stdout.write(export_markdown(history, args.id))
        elif args.action == "search":
            for conversation, snippet in history.search(args.query):
                print(f"{conversation.id:>5}  {conversation.title or '(untitled)'}: {snippet}")
        elif args.action == "export":
            if args.format == "json":
                print(json.dumps(export_json(history, args.id), ensure_ascii=False, indent=2))
            else:
                sys.stdout.write(export_markdown(history, args.id))
        elif args.action == "import":
            conversation = import_json(history, args.file.read_text(encoding="utf-8"))
            print(f"imported as conversation {conversation.id}")
        elif args.action == "rename":
            history.rename(args.id, args.title)
        elif args.action == "rm":
            for conversation_id in args.ids:
                history.delete(conversation_id)
    finally:
        history.close()
    return 0
