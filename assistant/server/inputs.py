"""What both APIs do with what a client sends: the size limit, JSON and field types, images, leaving early.

Bad input is an `ApiError` (status and one-line message); app.py writes it in the shape of the API the
request was for. Fields are checked strictly, as JSON types (`"0.5"` is not a number), and fields this
server does not know are ignored, as Ollama and most OpenAI-compatible servers do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from assistant.chat.engine import Conversation, Sampling, Turn
from assistant.chat.template import ToolCall
from assistant.images import ImageError, load_image
from models.errors import LvaError

MAX_BODY_BYTES = 100 * 2**20      # 100 MiB: a conversation with several full-size photos, base64-encoded
Model = TypeVar("Model", bound=BaseModel)
T = TypeVar("T")


class ApiError(LvaError):
    """A request this server will not answer: its HTTP status and a one-line `message`; `param` names the field,
    `code` is OpenAI's machine-readable name for the error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.http_status, self.message, self.param, self.code = status, message, param, code


class Schema(BaseModel):
    """Request shapes: JSON types exactly, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


async def read_body(request: Request) -> bytes:
    """The whole body, refused with 413 past `MAX_BODY_BYTES` (before reading it when the size is announced)."""
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    return bytes(body)


def _too_large() -> ApiError:
    return ApiError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB", code="request_too_large")


def parse(schema: type[Model], body: bytes) -> Model:
    """The body as `schema`, or a 400 that names the first field in the way."""
    try:
        return schema.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise ApiError(400, _describe(exc), param=_field(exc.errors()[0]["loc"]) or None) from None


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
    field = _field(first["loc"])
    if not field:
        return "the body must be a JSON object"
    # A union field (str | list) fails once per alternative: say them together.
    alternatives = [e["msg"].removeprefix("Input should be ") for e in errors if _field(e["loc"]) == field]
    return f"{field}: " + " or ".join(dict.fromkeys(alternatives))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field(loc: tuple) -> str:
    """`messages[0].content` from pydantic's location, without the tags it adds for union alternatives."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[a-z_]+", part) and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path


def image_from_base64(text: str, where: str) -> bytes:
    """Image bytes from base64 (a `data:` URL prefix is tolerated, as some Ollama clients send one)."""
    if text.startswith("data:"):
        return image_from_data_url(text, where)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where} is not base64-encoded image data", param=where) from None
    if not data:
        raise ApiError(400, f"{where} is empty", param=where)
    return data


def image_from_data_url(url: str, where: str) -> bytes:
    """Image bytes from a `data:[<type>][;base64],<data>` URL. lva never fetches: other URLs are refused."""
    if re.match(r"(?i)https?://", url):
        raise ApiError(400, f"{where}: lva does not fetch images from the network; send the image inline as a "
                            "data: URL (data:image/png;base64,...)", param=where, code="remote_image_refused")
    header, comma, payload = url.partition(",")
    if not url.startswith("data:") or not comma or not header.endswith(";base64"):
        raise ApiError(400, f"{where} must be a base64 data: URL (data:image/png;base64,...)", param=where)
    return image_from_base64(payload, where)


async def check_images(images: list[tuple[bytes, str]]) -> None:
    """Decode every image (off the event loop) so a broken or oversized one is a 400 now, not mid-answer."""
    for data, where in images:
        try:
            await run_in_threadpool(load_image, data)
        except ImageError as exc:
            raise ApiError(400, f"{where}: {str(exc).removeprefix('image data: ')}", param=where) from None


@dataclass
class Message:
    """A chat message as both APIs send it, once its images are decoded."""

    role: str
    text: str
    images: list[tuple[bytes, str]]              # (bytes, where in the request), in order
    tool_calls: tuple[ToolCall, ...] = ()        # an assistant message's calls


async def conversation_from(messages: list[Message], sampling: Sampling) -> Conversation:
    """The engine's conversation: system messages become its system prompt, and only the last image is
    kept, on its message (the model attends to one image, placed where the chat template puts it)."""
    system, turns = [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.role in ("system", "developer"):
            if message.images:
                raise ApiError(400, f"{where}: a system message cannot carry images", param=where)
            system.append(message.text)
        elif message.role in ("user", "assistant", "tool", "ipython"):      # ipython: Llama 3's name for tool
            if message.images and message.role != "user":
                raise ApiError(400, f"{where}: images go in user messages", param=where)
            if message.tool_calls and message.role != "assistant":
                raise ApiError(400, f"{where}: tool calls go in assistant messages", param=where)
            turns.append(Turn(message.role, message.text, image=message.images[-1][0] if message.images else None,
                              tool_calls=message.tool_calls))
        else:
            raise ApiError(400, f"{where}.role: {message.role!r} is not supported (system, user, assistant or tool)",
                           param=f"{where}.role")
    if not any(turn.role == "user" for turn in turns):
        raise ApiError(400, "messages has no user message", param="messages")
    await check_images([image for message in messages for image in message.images])
    return Conversation(system_prompt="\n\n".join(system) or None, turns=turns, sampling=sampling)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client hangs up first; `work` is then cancelled.

    Only for a request whose body was read: the next message the server gets is then the disconnect.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task in done else None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
