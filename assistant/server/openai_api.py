"""OpenAI's chat completions API, the part local clients use (the openai package's types).

    POST /v1/chat/completions   content as a string or parts (`text`, `image_url` with a data: URL); stream as
                                server-sent events ending in `data: [DONE]` (with stream_options.include_usage);
                                max_tokens / max_completion_tokens, temperature, top_p, seed, stop,
                                response_format (json_object, json_schema), tools and tool_choice (tool_calls
                                in assistant messages, results as role tool)
    GET  /v1/models, /v1/models/{id}

`usage.prompt_tokens` is the whole prompt; `usage.prompt_tokens_details.cached_tokens` the part the KV
cache already held. Remote image URLs are refused: lva never fetches.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import Field

from assistant.chat.engine import Sampling
from assistant.chat.template import ToolCall
from assistant.runtime.grammar import GrammarError, json_grammar
from assistant.server.catalog import Catalog, ServedModel
from assistant.server.inputs import ApiError, Message, Schema, conversation_from, image_from_data_url
from assistant.server.tools import CallReader, tool_call, tool_use, use_tools
from assistant.server.worker import Finished, Work


class TextPart(Schema):
    type: Literal["text"]
    text: str


class ImageUrl(Schema):
    url: str
    detail: str | None = None


class ImagePart(Schema):
    type: Literal["image_url"]
    image_url: ImageUrl | str


class ToolCallFunction(Schema):
    name: str
    arguments: str | dict[str, Any] = ""                   # JSON text, as OpenAI sends it (an object is taken too)


class ToolCallIn(Schema):
    id: str = ""
    type: str = "function"
    function: ToolCallFunction


class ChatMessage(Schema):
    role: str
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    tool_calls: list[ToolCallIn] | None = None               # (a result's tool_call_id: the template shows none)


class StreamOptions(Schema):
    include_usage: bool = False


class JsonSchema(Schema):
    name: str = ""
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class ResponseFormat(Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class ChatCompletionRequest(Schema):
    model: str = ""
    messages: list[ChatMessage] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None


async def completion_work(body: ChatCompletionRequest, catalog: Catalog, defaults: Sampling) -> Work:
    model = catalog.find(body.model)
    if not body.messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    if body.n not in (None, 1):
        raise ApiError(400, "n: lva writes one choice per request", param="n")
    use = tool_use(body.tools, body.tool_choice, "tool_choice")
    messages = [_message(message, index) for index, message in enumerate(body.messages)]
    conversation = await conversation_from(messages, sampling(defaults, body))
    use_tools(conversation, use, messages)
    return Work(model, conversation)


def _message(message: ChatMessage, index: int) -> Message:
    calls = tuple(tool_call(call.function.name, call.function.arguments, f"messages[{index}].tool_calls[{j}]")
                  for j, call in enumerate(message.tool_calls or []))
    if message.content is None or isinstance(message.content, str):
        return Message(message.role, message.content or "", [], calls)
    texts, images = [], []
    for part_index, part in enumerate(message.content):
        where = f"messages[{index}].content[{part_index}]"
        if isinstance(part, TextPart):
            texts.append(part.text)
        else:
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append((image_from_data_url(url, f"{where}.image_url"), f"{where}.image_url"))
    return Message(message.role, "\n".join(texts), images, calls)


def sampling(defaults: Sampling, body: ChatCompletionRequest) -> Sampling:
    changes: dict[str, Any] = {}
    if body.temperature is not None:
        changes["temperature"] = body.temperature
    if body.top_p is not None:
        changes["top_p"] = body.top_p
    if body.seed is not None:
        changes["seed"] = body.seed % 2**32
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if limit is not None:
        changes["max_tokens"] = limit
    if body.stop is not None:
        changes["stop"] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    if body.response_format is not None and body.response_format.type != "text":
        schema = body.response_format.json_schema.schema_ if body.response_format.json_schema else None
        if body.response_format.type == "json_schema" and schema is None:
            raise ApiError(400, "response_format.json_schema.schema is required", param="response_format")
        try:
            changes["grammar"] = json_grammar(schema)
        except GrammarError as exc:
            raise ApiError(400, f"response_format: {exc}", param="response_format") from None
    return replace(defaults, **changes)


# ---------------------------------------------------------------------------------------------- answers

class CompletionWriter:
    """A chat completion, whole or as chunks (server-sent events). A tool call comes as `tool_calls` with
    `finish_reason` "tool_calls"; streamed, as one chunk with the whole call before the last chunk."""

    media_type = "text/event-stream"

    def __init__(self, model: str, include_usage: bool = False, calls: CallReader | None = None) -> None:
        self.model, self.include_usage = model, include_usage
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.started = False
        self.calls = calls or CallReader(None)

    def _chunk(self, delta: dict, finish_reason: str | None = None, choices: bool = True) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
                 if choices else []}
        if self.include_usage:
            chunk["usage"] = None
        return _event(chunk)

    def piece(self, text: str) -> bytes:
        text = self.calls.feed(text)
        return self._text(text) if text else b""

    def _text(self, text: str) -> bytes:
        first = b"" if self.started else self._chunk({"role": "assistant", "content": ""})
        self.started = True
        return first + self._chunk({"content": text})

    def end(self, finished: Finished) -> bytes:
        held, calls = self.calls.finish()
        out = self._text(held) if held or not (self.started or calls) else b""     # an empty answer too
        if calls:
            first = {} if self.started else {"role": "assistant", "content": None}
            out += self._chunk({**first, "tool_calls": [{"index": i, **_call(c)} for i, c in enumerate(calls)]})
        out += self._chunk({}, _finish_reason(finished, calls))
        if self.include_usage:
            out += _event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "choices": [], "usage": _usage(finished)})
        return out + b"data: [DONE]\n\n"

    def error(self, message: str) -> bytes:
        return _event({"error": {"message": message, "type": "server_error", "param": None, "code": None}})

    def whole(self, finished: Finished, text: str) -> dict:
        shown = self.calls.feed(text)
        held, calls = self.calls.finish()
        message: dict[str, Any] = {"role": "assistant", "content": shown + held}
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": [_call(call) for call in calls]}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": finished.model,
                "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(finished, calls),
                             "logprobs": None}],
                "usage": _usage(finished)}


def _call(call: ToolCall) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def _finish_reason(finished: Finished, calls: list[ToolCall]) -> str:
    if calls:
        return "tool_calls"
    return "length" if finished.done_reason == "length" else "stop"


def _usage(finished: Finished) -> dict:
    reply = finished.reply
    assert reply is not None                         # only loads and unloads have none, and OpenAI asks for neither
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": reply.prompt_tokens - reply.evaluated_tokens}}


def _event(value: dict) -> bytes:
    return b"data: " + json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# ---------------------------------------------------------------------------------------------- models

def _model(model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": int(model.text.stat().st_mtime), "owned_by": "lva"}


def models(catalog: Catalog) -> dict:
    return {"object": "list", "data": [_model(m) for m in catalog.models()]}


def model(catalog: Catalog, name: str) -> dict:
    return _model(catalog.find(name))
