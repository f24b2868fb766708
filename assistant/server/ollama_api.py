"""Ollama's API (docs/api.md of Ollama; the fields ollama-python's `_types.py` sends and reads).

    POST /api/chat      messages (images: base64; tool_calls, role tool), stream (NDJSON, default true), options,
                        format, keep_alive, tools (options.tool_choice: lva's, as OpenAI's tool_choice)
    POST /api/generate  prompt, system, images, raw, stream, options, format, keep_alive
    GET  /api/tags      the models; POST /api/show one model; GET /api/ps the loaded one; GET /api/version

An empty prompt only loads the model (or unloads it with `keep_alive: 0`), as Ollama does. An empty
`messages` list is refused: Ollama loads the model there too, but a chat with nothing to answer is more
often a client's mistake, and /api/generate does the loading. `prompt_eval_count` is the prompt tokens
actually evaluated, which after KV-cache reuse is fewer than the prompt (Ollama reports it the same way);
OpenAI's `usage` carries the whole count.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import Field

from assistant.chat.engine import Conversation, Sampling
from assistant.chat.template import ToolCall
from assistant.runtime.grammar import GrammarError, json_grammar
from assistant.server.catalog import Catalog, ServedModel, rfc3339
from assistant.server.inputs import (ApiError, Message, Schema, check_images, conversation_from,
                                     image_from_base64)
from assistant.server.tools import CallReader, tool_call, tool_use, use_tools
from assistant.server.worker import Finished, ModelWorker, RawPrompt, Work

NANOSECONDS = 1_000_000_000


class Options(Schema):
    """Sampling and context options; the others Ollama knows (num_gpu, mirostat, ...) are ignored."""

    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: int | None = None
    num_predict: int | None = None                         # < 0: until the end of the answer or a full context
    num_ctx: Annotated[int, Field(gt=0)] | None = None
    stop: list[str] | str | None = None
    repeat_penalty: Annotated[float, Field(gt=0)] | None = None
    # Not Ollama's: OpenAI's tool_choice ("auto", "none", "required", {"type": "function", "function": {"name"}}),
    # here because options are what Ollama's clients pass through unchanged.
    tool_choice: str | dict[str, Any] | None = None


Format = Literal["", "json"] | dict[str, Any] | None        # "json", or a JSON schema


class ToolCallFunction(Schema):
    name: str
    arguments: dict[str, Any] | None = None


class ToolCallIn(Schema):
    function: ToolCallFunction


class ChatMessage(Schema):
    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None               # (a result's tool_name: the template shows none)


class ChatRequest(Schema):
    model: str = ""
    messages: list[ChatMessage] | None = None
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: float | str | None = None
    tools: list[Any] | None = None


class GenerateRequest(Schema):
    model: str = ""
    prompt: str = ""
    system: str = ""
    images: list[str] | None = None
    raw: bool = False
    suffix: str = ""
    template: str = ""
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: float | str | None = None


class ShowRequest(Schema):
    model: str = ""
    name: str = ""                                          # older clients' name for `model`


# ---------------------------------------------------------------------------------------------- requests

async def chat_work(body: ChatRequest, catalog: Catalog, defaults: Sampling) -> Work:
    model = catalog.find(body.model)
    if not body.messages:
        raise ApiError(400, "messages is required and must not be empty (to load the model, POST /api/generate "
                            "with an empty prompt)", param="messages")
    keep_alive, options = keep_alive_seconds(body.keep_alive), body.options or Options()
    use = tool_use(body.tools, options.tool_choice, "options.tool_choice")
    messages = [_message(message, index) for index, message in enumerate(body.messages)]
    conversation = await conversation_from(messages, sampling(defaults, options, body.format))
    use_tools(conversation, use, messages)
    return Work(model, conversation, options.num_ctx, keep_alive)


def _message(message: ChatMessage, index: int) -> Message:
    where = f"messages[{index}]"
    images = [(image_from_base64(image, f"{where}.images[{j}]"), f"{where}.images[{j}]")
              for j, image in enumerate(message.images or [])]
    calls = tuple(tool_call(call.function.name, call.function.arguments or {}, f"{where}.tool_calls[{j}]")
                  for j, call in enumerate(message.tool_calls or []))
    return Message(message.role, message.content, images, calls)


async def generate_work(body: GenerateRequest, catalog: Catalog, defaults: Sampling) -> Work:
    model = catalog.find(body.model)
    if body.suffix:
        raise ApiError(400, "suffix is not supported: Llama 3.2 Vision has no fill-in-the-middle", param="suffix")
    if body.template:
        raise ApiError(400, "template is not supported: lva uses the model's chat template (or raw: true)",
                       param="template")
    keep_alive, options = keep_alive_seconds(body.keep_alive), body.options or Options()
    images = [(image_from_base64(image, f"images[{i}]"), f"images[{i}]") for i, image in enumerate(body.images or [])]
    if not body.prompt and not images:
        return Work(model, None, keep_alive=keep_alive)
    chosen = sampling(defaults, options, body.format)
    task: RawPrompt | Conversation
    if body.raw:
        await check_images(images)
        task = RawPrompt(body.prompt, images[-1][0] if images else None, chosen)
    else:
        system = [Message("system", body.system, [])] if body.system else []
        task = await conversation_from(system + [Message("user", body.prompt, images)], chosen)
    return Work(model, task, options.num_ctx, keep_alive)


def sampling(defaults: Sampling, options: Options, format: Format) -> Sampling:
    """The server's defaults (the command line's), with what the request sets."""
    changes: dict[str, Any] = {name: getattr(options, name) for name in
                               ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
                               if getattr(options, name) is not None}
    if options.seed is not None:
        changes["seed"] = options.seed % 2**32 if options.seed >= 0 else None
    if options.num_predict is not None:
        changes["max_tokens"] = options.num_predict if options.num_predict >= 0 else None
    if options.stop is not None:
        changes["stop"] = (options.stop,) if isinstance(options.stop, str) else tuple(options.stop)
    if format:
        try:
            changes["grammar"] = json_grammar(None if format == "json" else format)
        except GrammarError as exc:
            raise ApiError(400, f"format: {exc}", param="format") from None
    return replace(defaults, **changes)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: float | str | None) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1"); None: stay loaded."""
    if value is None or value == "":
        return None
    if isinstance(value, float):
        return value
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return sign * float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ApiError(400, f"keep_alive: {value!r} is not a duration (such as 300, \"5m\" or \"-1\")",
                       param="keep_alive")
    return sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


# ---------------------------------------------------------------------------------------------- answers

def _now() -> str:
    return rfc3339(time.time())


class AnswerWriter:
    """/api/chat's objects; /api/generate's differ only in where the text goes (`GenerateWriter`).

    A tool call comes as `message.tool_calls`; streamed, in one object of its own before the last, as Ollama
    sends it."""

    media_type = "application/x-ndjson"

    def __init__(self, model: str, calls: CallReader | None = None) -> None:
        self.model = model
        self.calls = calls or CallReader(None)

    def _text(self, text: str, calls: list[ToolCall]) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return {"message": message}

    def piece(self, text: str) -> bytes:
        text = self.calls.feed(text)
        return self._piece(text, []) if text else b""

    def _piece(self, text: str, calls: list[ToolCall]) -> bytes:
        return _line({"model": self.model, "created_at": _now(), **self._text(text, calls), "done": False})

    def end(self, finished: Finished) -> bytes:
        held, calls = self.calls.finish()
        return (self._piece(held, calls) if held or calls else b"") + _line(self._last(finished, "", []))

    def error(self, message: str) -> bytes:
        return _line({"error": message})

    def whole(self, finished: Finished, text: str) -> dict:
        shown = self.calls.feed(text)
        held, calls = self.calls.finish()
        return self._last(finished, shown + held, calls)

    def _last(self, finished: Finished, text: str, calls: list[ToolCall]) -> dict:
        answer = {"model": finished.model, "created_at": _now(), **self._text(text, calls), "done": True,
                  "done_reason": finished.done_reason}
        reply = finished.reply
        if reply is None:                                   # a load or an unload
            return answer
        return {**answer, "total_duration": _ns(finished.total_seconds), "load_duration": _ns(finished.load_seconds),
                "prompt_eval_count": reply.evaluated_tokens, "prompt_eval_duration": _ns(reply.prompt_seconds),
                "eval_count": reply.completion_tokens, "eval_duration": _ns(reply.seconds - reply.prompt_seconds)}


class GenerateWriter(AnswerWriter):
    def _text(self, text: str, calls: list[ToolCall]) -> dict:
        return {"response": text}


def _line(value: dict) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _ns(seconds: float) -> int:
    return max(0, round(seconds * NANOSECONDS))


# ---------------------------------------------------------------------------------------------- models

def _details(model: ServedModel) -> dict:
    return {"parent_model": "", "format": "gguf", "family": "mllama", "families": ["mllama"],
            "parameter_size": "", "quantization_level": model.quant}


def _entry(model: ServedModel) -> dict:
    return {"name": model.name, "model": model.name, "modified_at": model.modified_at, "size": model.size,
            "digest": model.digest, "details": _details(model)}


def tags(catalog: Catalog) -> dict:
    return {"models": [_entry(m) for m in catalog.models()]}


def show(catalog: Catalog, body: ShowRequest, defaults: Sampling, n_ctx: int) -> dict:
    model = catalog.find(body.model or body.name)
    metadata = model.metadata()
    parameters = {"temperature": defaults.temperature, "top_p": defaults.top_p, "top_k": defaults.top_k,
                  "min_p": defaults.min_p, "repeat_penalty": defaults.repeat_penalty, "num_ctx": n_ctx}
    template = str(metadata.pop("tokenizer.chat_template", ""))
    capabilities = ["completion"] + (["vision"] if model.vision else []) + (["tools"] if "tools" in template else [])
    return {"modelfile": f"# served by lva\nFROM {model.text}\n",
            "parameters": "\n".join(f"{name:<30} {value}" for name, value in parameters.items()),
            "template": template, "details": _details(model), "model_info": metadata, "capabilities": capabilities,
            "modified_at": model.modified_at}


def running(worker: ModelWorker) -> dict:
    """The loaded model, as Ollama lists it, and lva's own field `slots`: answers decoded together at most
    (--parallel) and now."""
    model, expires_at = worker.loaded, worker.expires_at
    if model is None or (expires_at is not None and expires_at <= time.time()):   # expired: unloading
        return {"models": []}
    forever = 253402300799.0                                # 9999-12-31: no expiry
    return {"models": [{**_entry(model), "expires_at": rfc3339(expires_at or forever), "size_vram": 0,
                        "context_length": worker.context_length,
                        "slots": {"total": worker.parallel, "in_use": worker.slots_in_use}}]}
