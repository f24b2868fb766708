"""`lva chat` (and plain `lva`): the terminal app."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from assistant.commands import common


def add_parser(commands) -> None:
    parser = commands.add_parser("chat", help="chat about an image in the terminal app (the default)",
                                 description="Open the terminal app: drop in an image and chat about it; "
                                             "conversations are kept.")
    parser.add_argument("--model", help="model name in the store or path to a text GGUF "
                                        "(default: the only model in the store)")
    common.add_context_option(parser)
    common.add_device_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from assistant import store
    from assistant.cli import BUG, EXIT_BUG
    from assistant.tui.app import LvaApp

    model = getattr(args, "model", None)
    path: Path | None = store.resolve_model(model) if model else None
    app = LvaApp(model_path=path, n_ctx=getattr(args, "ctx", 4096), **common.device_options(args))
    app.run()
    if app.return_code:              # an exception nothing caught ended it (Textual printed its traceback): a bug
        print(BUG, file=sys.stderr)
        return EXIT_BUG
    return 0
