"""The Starlette app: every route, the API key, one log line per request, errors in each API's shape.

A generation request becomes a job in the worker's queue. The response waits for its first event while
watching the client: a client that hangs up before then has its job dropped (or stopped). Then it streams
(NDJSON for Ollama, server-sent events for OpenAI) or answers whole; a stream whose client leaves is
cancelled by Starlette, which stops the job at its next piece.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from assistant.chat.engine import ContextOverflow, Sampling
from assistant.server import ollama_api, openai_api
from assistant.server.catalog import Catalog
from assistant.server.inputs import ApiError, parse, read_body, until_disconnect
from assistant.server.tools import call_reader
from assistant.server.worker import Failed, Finished, Job, ModelWorker, Piece, Work
from assistant.store import ModelNotFound
from models.errors import LvaError

LOG_ENTRY = "lva.log"
CLIENT_GONE = 499                                   # nginx's "client closed request": only the log sees it


@dataclass
class Server:
    """What the routes share."""

    worker: ModelWorker
    catalog: Catalog
    defaults: Sampling                              # sampling for requests that do not say
    api_key: str | None = None


class Writer(Protocol):
    """How one API writes an answer: `ollama_api.AnswerWriter`, `openai_api.CompletionWriter`."""

    media_type: str

    def piece(self, text: str) -> bytes: ...               # empty while the text may be a tool call

    def end(self, finished: Finished) -> bytes: ...

    def error(self, message: str) -> bytes: ...

    def whole(self, finished: Finished, text: str) -> dict: ...


# ---------------------------------------------------------------------------------------------- routes

def _server(request: Request) -> Server:
    return request.app.state.server


async def root(request: Request) -> Response:
    return PlainTextResponse("lva is running: Ollama's API under /api, OpenAI's under /v1\n")


async def version(request: Request) -> Response:
    return JSONResponse({"version": metadata.version("lva")})


async def tags(request: Request) -> Response:
    return JSONResponse(ollama_api.tags(_server(request).catalog))


async def running(request: Request) -> Response:
    return JSONResponse(ollama_api.running(_server(request).worker))


async def show(request: Request) -> Response:
    server = _server(request)
    body = parse(ollama_api.ShowRequest, await read_body(request))
    # Reading a GGUF's metadata parses its vocabulary: off the event loop.
    context_length = server.worker.context_length
    return JSONResponse(await run_in_threadpool(ollama_api.show, server.catalog, body, server.defaults, context_length))


async def chat(request: Request) -> Response:
    server = _server(request)
    body = parse(ollama_api.ChatRequest, await read_body(request))
    work = await ollama_api.chat_work(body, server.catalog, server.defaults)
    return await answer(request, work, ollama_api.AnswerWriter(work.model.name, call_reader(work.task)),
                        body.stream and work.task is not None)


async def generate(request: Request) -> Response:
    server = _server(request)
    body = parse(ollama_api.GenerateRequest, await read_body(request))
    work = await ollama_api.generate_work(body, server.catalog, server.defaults)
    return await answer(request, work, ollama_api.GenerateWriter(work.model.name),
                        body.stream and work.task is not None)


async def models(request: Request) -> Response:
    return JSONResponse(openai_api.models(_server(request).catalog))


async def model(request: Request) -> Response:
    return JSONResponse(openai_api.model(_server(request).catalog, request.path_params["name"]))


async def chat_completions(request: Request) -> Response:
    server = _server(request)
    body = parse(openai_api.ChatCompletionRequest, await read_body(request))
    work = await openai_api.completion_work(body, server.catalog, server.defaults)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    writer = openai_api.CompletionWriter(work.model.name, include_usage, call_reader(work.task))
    return await answer(request, work, writer, body.stream)


ROUTES = [
    Route("/", root, methods=["GET"]),                                   # GET routes answer HEAD too
    Route("/api/version", version, methods=["GET"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/ps", running, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{name:path}", model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
]


# ---------------------------------------------------------------------------------------------- answers

async def answer(request: Request, work: Work, writer: Writer, stream: bool) -> Response:
    """Queue the work and answer with what the worker says, whole or streamed."""
    job = Job(work, asyncio.get_running_loop())
    request.scope[LOG_ENTRY].job = job
    _server(request).worker.submit(job)
    if not stream:
        ended = await until_disconnect(request, job.rest())
        if ended is None:
            return _client_gone(job)
        text, last = ended
        if isinstance(last, Failed):
            raise api_error(last.error)
        return JSONResponse(writer.whole(last, text))
    first = await until_disconnect(request, job.events.get())
    if first is None:
        return _client_gone(job)
    if isinstance(first, Failed):
        raise api_error(first.error)
    return JobStream(job, _stream(job, first, writer), media_type=writer.media_type)


async def _stream(job: Job, event: Piece | Finished | Failed, writer: Writer) -> AsyncIterator[bytes]:
    while True:
        if isinstance(event, Piece):
            if data := writer.piece(event.text):
                yield data
        elif isinstance(event, Finished):
            yield writer.end(event)
            return
        else:
            yield writer.error(api_error(event.error).message)
            return
        event = await job.events.get()


class JobStream(StreamingResponse):
    """A streamed answer that stops its job when the response ends, which is early when the client leaves
    (Starlette then cancels the stream)."""

    def __init__(self, job: Job, content: AsyncIterator[bytes], media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()                          # a no-op once the job has finished


def _client_gone(job: Job) -> Response:
    job.cancel()
    return Response(status_code=CLIENT_GONE)


def api_error(error: Exception) -> ApiError:
    """What an error means to a client: an `LvaError` its own status and message, anything else a bug (500)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ModelNotFound):
        return ApiError(error.http_status, str(error), param="model", code="model_not_found")
    if isinstance(error, ContextOverflow):
        return ApiError(error.http_status, f"{error} (a longer context: num_ctx, or lva serve --ctx)",
                        param="messages", code="context_length_exceeded")
    if isinstance(error, LvaError):
        return ApiError(error.http_status, str(error))
    return internal_error(error)


def internal_error(error: BaseException) -> ApiError:
    """A bug in lva: the client is told so in one line; the traceback goes to the server's log, not to it."""
    summary = f"{type(error).__name__}: {str(error).splitlines()[0]}" if str(error) else type(error).__name__
    return ApiError(500, f"internal error ({summary}): a bug in lva; the server's log has its traceback")


# ---------------------------------------------------------------------------------------------- errors

def _is_openai(scope: Scope) -> bool:
    return scope["path"].startswith("/v1/")


def error_response(scope: Scope, error: ApiError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """Ollama's `{"error": "..."}`, or OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
    if LOG_ENTRY in scope:
        scope[LOG_ENTRY].note = error.message
    if not _is_openai(scope):
        return JSONResponse({"error": error.message}, status_code=error.http_status, headers=headers)
    kind = {401: "authentication_error", 404: "invalid_request_error"}.get(
        error.http_status, "server_error" if error.http_status >= 500 else "invalid_request_error")
    body = {"message": error.message, "type": kind, "param": error.param, "code": error.code}
    return JSONResponse({"error": body}, status_code=error.http_status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    return error_response(request.scope, api_error(exc))


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug: the client gets a JSON 500, the server's log the traceback (Starlette raises it on to uvicorn,
    which logs it)."""
    return error_response(request.scope, internal_error(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(request.scope, ApiError(exc.status_code, message.get(exc.status_code, exc.detail)),
                          headers=exc.headers)


# ---------------------------------------------------------------------------------------------- middleware

class RequireApiKey:
    """With a key, every request needs `Authorization: Bearer KEY`; others get 401."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode()):
            return await self.app(scope, receive, send)
        error = ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")
        await error_response(scope, error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)


@dataclass
class LogEntry:
    status: int = 500
    job: Job | None = None
    note: str = ""


class RequestLog:
    """One line per request once its response is complete: method, path, status, tokens, seconds."""

    def __init__(self, app: ASGIApp, write: Callable[[str], None]) -> None:
        self.app, self.write = app, write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        entry, start = LogEntry(), time.perf_counter()
        scope[LOG_ENTRY] = entry

        async def keep_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, keep_status)
        except Exception:
            self.write(_line(scope, entry, time.perf_counter() - start))
            raise
        if entry.job is not None:
            await entry.job.done.wait()                  # a stopped or dropped job: what the worker did with it
        self.write(_line(scope, entry, time.perf_counter() - start))


def _line(scope: Scope, entry: LogEntry, seconds: float) -> str:
    parts = [scope["method"], scope["path"], str(entry.status)]
    job = entry.job
    if job is not None and job.dropped:
        parts.append("dropped: the client left while it waited")
    elif job is not None and isinstance(job.outcome, Finished):
        reply, finished = job.outcome.reply, job.outcome
        if reply is None:
            parts.append(finished.done_reason)
        else:
            parts.append(f"{reply.prompt_tokens}+{reply.completion_tokens} tokens, {reply.evaluated_tokens} evaluated,"
                         f" {finished.images_encoded} images encoded, {reply.done_reason}")
            if reply.status == "stopped":
                parts.append("(the client left)")
    if entry.note:
        parts.append(f"- {entry.note}")
    return " ".join(parts) + f", {seconds:.2f} s"


def log_to_stderr(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the app

def create_app(server: Server, write_log: Callable[[str], None] = log_to_stderr) -> Starlette:
    from starlette.middleware import Middleware

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        LvaError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=ROUTES, exception_handlers=handlers,
                    middleware=[Middleware(RequestLog, write=write_log), Middleware(RequireApiKey, key=server.api_key)])
    app.state.server = server
    return app
