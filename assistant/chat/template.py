"""The model's own chat template, rendered like HF's `apply_chat_template`, in jinja2's sandbox.

The template comes from a file a user downloaded, so it runs sandboxed: it can build a string and
nothing else. What the template sees is what HF transformers gives it (`render_jinja_template` in 5.23): the
messages as dicts, `tools` as the client's JSON schemas, and a `tojson` that keeps keys in order and characters
as they are (jinja's own sorts keys and escapes HTML), so prompts with tools are HF's token for token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.errors import LvaError

IMAGE_TOKEN = "<|image|>"


class ChatTemplateError(LvaError):
    """The template refused the conversation (it says why) or could not be rendered."""


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class TemplateMessage:
    """A message as the template renders it; the engine makes them from its turns (only the image the model
    attends to is shown), the server's API schemas are parsed into turns before that."""

    role: str                      # system | user | assistant | tool (a tool's result; `ipython` in Llama 3)
    text: str
    has_image: bool = False        # the image is placed before the text, as Meta's examples do
    tool_calls: tuple[ToolCall, ...] = ()   # an assistant message that calls tools


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """HF's `tojson` filter: plain `json.dumps`."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str = "") -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = environment.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[TemplateMessage], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **variables: Any) -> str:
        """The prompt text; images appear as `<|image|>` where the template puts them. `tools` are JSON schemas
        (`{"type": "function", "function": {"name", "description", "parameters"}}`), shown as the template shows
        them; `variables` are the template's own (`date_string`, `tools_in_user_message`, ...)."""
        rendered = [self._message(m) for m in messages]
        try:
            return self.template.render(messages=rendered, add_generation_prompt=add_generation_prompt, tools=tools,
                                        bos_token=self.bos_token, eos_token=self.eos_token, **variables)
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from None

    @staticmethod
    def _message(message: TemplateMessage) -> dict[str, Any]:
        """The message as HF's chat-template guide writes it."""
        content: Any = message.text
        if message.has_image:
            content = [{"type": "image"}, {"type": "text", "text": message.text}]
        rendered = {"role": message.role, "content": content}
        if message.tool_calls:
            rendered["tool_calls"] = [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                                      for call in message.tool_calls]
        return rendered
