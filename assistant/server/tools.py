"""Tool calling for both APIs: the tools a client offers, the call it may require, the call in an answer.

Llama 3.1 and 3.2 call a tool by answering with one JSON object, `{"name": ..., "parameters": {...}}`, at times
after `<|python_tag|>` (a special token: it never reaches the answer's text). The model's own chat template
shows it the tools (their JSON schemas, as the client sent them) and the calls and results of earlier turns
(results as `ipython` messages), exactly as HF transformers renders them. This module checks what the client
sent and reads the call back out of the answer:

* `tool_choice` "auto" (the default): the answer is a call when it is one JSON object that names an offered
  tool; otherwise it stays text. An answer that starts with `{` is held back until it ends, so a call never
  streams out as text.
* "required", or one function by name: a grammar made from the tools' JSON schemas lets the model write
  nothing but a call (to that function), so the answer is one, unless max_tokens cuts it first.
* "none": the tools are not shown to the model, and the answer is text.

With "auto", tools that would crowd the answer out of the context are left out too (`Conversation.optional_tools`):
Open WebUI 0.12.4 sends 36 built-in tools with every message: 8,100 tokens in Llama 3's template.

Meta's prompt format for Llama 3.2 Vision says that tool calling does not work with an image in the prompt
(llama-models, models/llama3_2/vision_prompt_format.md); its template then writes no system message, and puts
the tools in the first user message, which loses an image there. So when the conversation has an image, "auto"
leaves the tools out and the answer is text, and requiring a call is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from assistant.chat.engine import Conversation, Sampling
from assistant.chat.template import ToolCall
from assistant.runtime.grammar import GrammarError, json_grammar
from assistant.server.inputs import ApiError, Message


@dataclass(frozen=True)
class ToolUse:
    """The tools of one request and what it asks of them."""

    schemas: list[dict[str, Any]]            # as the client sent them: what the template shows
    choice: str = "auto"                     # auto | none | required | function (call `function`)
    function: str | None = None
    choice_field: str = "tool_choice"        # where the request said it (Ollama: options.tool_choice)

    @property
    def names(self) -> list[str]:
        return [schema["function"]["name"] for schema in self.schemas]


def tool_use(tools: list[Any] | None, choice: Any, choice_field: str) -> ToolUse | None:
    """The request's tools, checked, and its `tool_choice` (OpenAI's values; `choice_field` names where it was)."""
    schemas = [_checked_tool(tool, f"tools[{index}]") for index, tool in enumerate(tools or [])]
    names = [schema["function"]["name"] for schema in schemas]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ApiError(400, f"tools[{index}].function.name: a second tool named {name!r}", param="tools")
    if choice is None or choice == "auto":
        return ToolUse(schemas, choice_field=choice_field) if schemas else None
    if choice in ("none", "required"):
        if choice == "required" and not schemas:
            raise ApiError(400, f"{choice_field} is 'required' but the request offers no tools", param=choice_field)
        return ToolUse(schemas, choice, choice_field=choice_field) if schemas else None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ApiError(400, f"{choice_field} must be 'auto', 'none', 'required' or "
                            '{"type": "function", "function": {"name": ...}}', param=choice_field)
    if name not in names:
        offered = ", ".join(names) or "none"
        raise ApiError(400, f"{choice_field} names the function {name!r}, which is not among the request's tools "
                            f"({offered})", param=choice_field)
    return ToolUse(schemas, "function", name, choice_field)


def _checked_tool(tool: Any, where: str) -> dict[str, Any]:
    """A tool as OpenAI and Ollama describe one: `{"type": "function", "function": {"name", "description",
    "parameters": a JSON schema of an object}}`."""
    if not isinstance(tool, dict):
        raise ApiError(400, f"{where} must be an object", param=where)
    if tool.get("type", "function") != "function":
        raise ApiError(400, f"{where}.type: {tool.get('type')!r} tools are not supported (only 'function')",
                       param=where)
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ApiError(400, f"{where}.function must be an object with the tool's name and parameters", param=where)
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"{where}.function.name must be a non-empty string", param=where)
    if not isinstance(function.get("description", ""), str):
        raise ApiError(400, f"{where}.function.description must be a string", param=where)
    parameters = function.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ApiError(400, f"{where}.function.parameters must be a JSON schema (an object)", param=where)
    if parameters.get("type", "object") != "object":
        raise ApiError(400, f"{where}.function.parameters must describe an object, not {parameters.get('type')!r}",
                       param=where)
    properties = parameters.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
        raise ApiError(400, f"{where}.function.parameters.properties must map names to JSON schemas", param=where)
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ApiError(400, f"{where}.function.parameters.required must be a list of names", param=where)
    return tool


def tool_call(name: Any, arguments: Any, where: str) -> ToolCall:
    """A call from an earlier turn of the conversation (`arguments`: an object, or OpenAI's JSON text of one)."""
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"{where}.function.name must be a non-empty string", param=where)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict):
        raise ApiError(400, f"{where}.function.arguments must be a JSON object", param=where)
    return ToolCall(name, arguments)


def use_tools(conversation: Conversation, use: ToolUse | None, messages: list[Message]) -> None:
    """Show the tools to the model as `use` asks, and constrain the answer when it must be a call.

    The calls in `messages` (the request's, in order) must name offered tools, when the request offers any."""
    if use is None:
        return
    for index, message in enumerate(messages):
        for number, call in enumerate(message.tool_calls):
            if call.name not in use.names:
                where = f"messages[{index}].tool_calls[{number}]"
                raise ApiError(400, f"{where}.function.name: {call.name!r} is not among the request's tools "
                                    f"({', '.join(use.names)})", param=where)
    if use.choice == "none":
        return
    if any(turn.image is not None for turn in conversation.turns):
        if use.choice != "auto":
            raise ApiError(400, f"{use.choice_field}: Llama 3.2 Vision does not call tools with an image in the "
                                "conversation (Meta's prompt format); send the request without the image, or let the "
                                "model choose ('auto': the answer is then text)", param=use.choice_field)
        return                                   # Meta: no tool calls with images; answered as text
    conversation.tools, conversation.optional_tools = use.schemas, use.choice == "auto"
    if use.choice != "auto":
        conversation.sampling = _constrained(conversation.sampling, use)


def _constrained(sampling: Sampling, use: ToolUse) -> Sampling:
    """`sampling` with a grammar that allows only a call, to any tool (required) or to the named one."""
    if sampling.grammar is not None:
        raise ApiError(400, f"{use.choice_field}: a required tool call and a response format cannot both shape the "
                            "answer", param=use.choice_field)
    schemas = [s for s in use.schemas if use.function in (None, s["function"]["name"])]
    calls = [{"type": "object", "properties": {"name": {"const": s["function"]["name"]},
                                               "parameters": _object_schema(s["function"].get("parameters", {}))},
              "required": ["name", "parameters"], "additionalProperties": False} for s in schemas]
    try:
        grammar = json_grammar(calls[0] if len(calls) == 1 else {"anyOf": calls})
    except GrammarError as exc:
        raise ApiError(400, f"tools: {exc}", param="tools") from None
    return replace(sampling, grammar=grammar)


def _object_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {}, **parameters}


def parse_call(text: str, names: list[str]) -> ToolCall | None:
    """The call `text` makes, or None when it is not one: one JSON object naming a tool of `names`, with its
    arguments under "parameters" (Llama 3.1's format) or "arguments"."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("parameters", value.get("arguments", {}))
    return ToolCall(value["name"], arguments) if isinstance(arguments, dict) else None


class CallReader:
    """Splits an answer into text and a tool call while it streams: text that may be a call is held back."""

    def __init__(self, names: list[str] | None) -> None:
        self.names = names                   # None: tools are not in play, everything is text
        self.held = ""
        self.text_only = names is None

    def feed(self, text: str) -> str:
        """What of the answer so far can go to the client now."""
        if self.text_only:
            return text
        self.held += text
        start = self.held.lstrip()
        if start and not start.startswith("{"):
            self.text_only, text, self.held = True, self.held, ""
            return text
        return ""

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the answer: the text still held back, and the calls."""
        held, self.held = self.held, ""
        call = parse_call(held, self.names) if held and self.names else None
        return ("", [call]) if call is not None else (held, [])


def call_reader(conversation: Any) -> CallReader:
    """The reader for an answer to `conversation` (a Conversation, or None / a raw prompt: no tools)."""
    tools = conversation.tools if isinstance(conversation, Conversation) else None
    return CallReader([schema["function"]["name"] for schema in tools] if tools else None)
