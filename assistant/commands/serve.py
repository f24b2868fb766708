"""`lva serve`: Ollama's and OpenAI's HTTP APIs on one port, for apps that talk to a local model."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys

from assistant.commands import common
from models.errors import LvaError

DEFAULT_PORT = 11434            # Ollama's: its clients (Open WebUI, ollama-python, editors) find lva unchanged


class PortInUse(LvaError):
    """The port is taken; one line for the user."""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "serve", help="serve Ollama's and OpenAI's APIs to local apps (Open WebUI, ollama-python, openai, ...)",
        description="Serve Ollama's API (/api/chat, /api/generate, /api/tags, ...) and OpenAI's "
                    "(/v1/chat/completions, /v1/models) on one port, images included. Up to --parallel requests are "
                    "answered together (decoded in one batch), the others wait in one queue in front of one model; "
                    "nothing goes to the history. Example: lva serve --model llama-vision-11b --parallel 4",
        epilog="The sampling options are defaults for requests that do not set them. Without --max-tokens an "
               "answer runs to its end or to a full context. The API key can also come from $LVA_API_KEY.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}, Ollama's; 0 picks a free one)")
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every request")
    common.add_model_options(parser)
    common.add_parallel_option(parser, "requests answered together", honour="OLLAMA_NUM_PARALLEL")
    parser.set_defaults(run=run, max_tokens=None)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from assistant.server.app import Server, create_app, log_to_stderr
    from assistant.server.catalog import Catalog
    from assistant.server.worker import Job, ModelWorker, Work

    catalog = Catalog(args.model)                    # an unknown --model fails here, before the port is taken
    served = catalog.find(catalog.default) if catalog.default is not None else None
    parallel = common.parallel_from(args, served.text if served else None, "OLLAMA_NUM_PARALLEL")
    api_key = args.api_key or os.environ.get("LVA_API_KEY") or None
    sock = listen(args.host, args.port)
    worker = ModelWorker(lambda text: common.load(args, text), n_ctx=args.ctx, log=log_to_stderr, parallel=parallel)
    worker.start()
    if served is not None:                           # load it now; requests wait behind the load
        worker.submit(Job(Work(served, None), loop=None))
    app = create_app(Server(worker, catalog, common.sampling_from(args), api_key))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    default = f"default model {catalog.default}" if catalog.default else "no default model: requests name one"
    print(f"lva serve: listening on http://{shown}:{port} (Ollama's API under /api, OpenAI's under /v1); {default}"
          f"; {parallel} answer{'s' if parallel > 1 else ''} at a time{'; API key required' if api_key else ''}",
          file=sys.stderr, flush=True)
    if not common.is_loopback(args.host) and api_key is None:
        print(f"lva serve: warning: listening on {args.host} without --api-key: anyone who can reach this machine "
              "can use the model", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        worker.stop()
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound and listening on host:port, or a one-line error (PortInUse when it is taken)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # not a port in use: one in TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is in use (is Ollama running?); choose another with --port") \
                from None
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock
