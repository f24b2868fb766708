"""The model's own chat template, rendered like HF's `apply_chat_template`, in jinja2's sandbox.

The template comes from a file a user downloaded, so it runs sandboxed: it can build a string and
nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.errors import LvaError
IMAGE_TOKEN = "<|image|>"


class ChatTemplateError(LvaError):
    """The template refused the conversation (it says why) or could not be rendered."""


@dataclass(frozen=True)
class TemplateMessage:
    """A message as the template renders it; the engine makes them from its turns (only the image the model
    attends to is shown), the server's API schemas are parsed into turns before that."""

    role: str                      # system | user | assistant
    text: str
    has_image: bool = False        # the image is placed before the text, as Meta's examples do


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str = "") -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = environment.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[TemplateMessage], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt text; images appear as `<|image|>` where the template puts them."""
        rendered = [self._message(m) for m in messages]
        try:
            return self.template.render(messages=rendered, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, **variables)
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from None

    @staticmethod
    def _message(message: TemplateMessage) -> dict[str, Any]:
        if not message.has_image:
            return {"role": message.role, "content": message.text}
        return {"role": message.role, "content": [{"type": "image"}, {"type": "text", "text": message.text}]}
