"""Tool calling through `lva serve`, driven by ollama-python, openai-python and LangChain on the tiny model.

The tiny model's weights are random, so left to itself it writes noise; with `tool_choice` "required" or a named
function the answer is constrained to a call, which is what these tests check the clients receive: structured,
valid under the tool's schema, streamed and not. A second turn with the tool's result must be answered.
The prompts themselves are checked against HF transformers: requests of both APIs, as `lva serve` translates
them, become the prompts of tests/fixtures/tool_prompts.json token for token.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any, Literal

import ollama
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI

from assistant import load_model
from assistant.chat.engine import ChatEngine, Sampling
from assistant.server import ollama_api, openai_api
from assistant.server.catalog import Catalog
from assistant.server.inputs import parse
from tests.server.lva_server import FIXTURES, LvaServer

GOLDEN = json.loads((FIXTURES / "tool_prompts.json").read_text())
CASES = {case["name"]: case for case in GOLDEN["cases"]}
IMAGE = FIXTURES / "images" / "rgb_173x97.png"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "current_time", "description": "The time now in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"]}}}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "current_time"}}
# Room for a whole call: the grammar lets the model put a space after each token of JSON.
OLLAMA_OPTIONS = {"num_predict": 200, "temperature": 0.7, "seed": 3}


def assert_valid_call(name: str, arguments: Any, names: tuple[str, ...] = ("get_weather", "current_time")) -> None:
    """A call to one of `names` whose arguments follow that tool's schema."""
    assert name in names
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name]
    assert isinstance(arguments, dict) and set(schema["required"]) <= set(arguments) <= set(schema["properties"])
    for key, value in arguments.items():
        assert value in schema["properties"][key]["enum"]


# ---------------------------------------------------------------------------------------------- the prompts

def ollama_request(case: dict, tools: list | None) -> dict:
    """The case's conversation as an Ollama client sends it."""
    messages = []
    for message in case["messages"]:
        sent: dict[str, Any] = {"role": message["role"], "content": message.get("content", "")}
        if isinstance(sent["content"], list):
            sent["content"] = "".join(part.get("text", "") for part in message["content"])
            sent["images"] = [base64.b64encode(IMAGE.read_bytes()).decode()]
        if "tool_calls" in message:
            sent["tool_calls"] = [{"function": call["function"]} for call in message["tool_calls"]]
        messages.append(sent)
    return {"model": "tiny-a", "messages": messages, "tools": tools}


def openai_request(case: dict, tools: list | None) -> dict:
    """The case's conversation as an OpenAI client sends it: arguments as JSON text, results by call id."""
    messages = []
    for index, message in enumerate(case["messages"]):
        sent: dict[str, Any] = {"role": message["role"], "content": message.get("content")}
        if isinstance(sent["content"], list):
            url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
            sent["content"] = [{"type": "image_url", "image_url": {"url": url}} if part["type"] == "image"
                               else part for part in message["content"]]
        if "tool_calls" in message:
            sent["tool_calls"] = [{"id": f"call_{index}", "type": "function",
                                   "function": {"name": call["function"]["name"],
                                                "arguments": json.dumps(call["function"]["arguments"])}}
                                  for call in message["tool_calls"]]
        if message["role"] in ("tool", "ipython"):
            sent["tool_call_id"] = f"call_{index - 1}"
        messages.append(sent)
    return {"model": "tiny-a", "messages": messages, "tools": tools}


# (golden case, the tools the request offers): every shape a client can send. The last offers tools with an
# image, which lva leaves out (Meta: no tool calls with images): the prompt is HF's for the same messages without.
SERVED = [("tools_in_user_message", CASES["tools_in_user_message"]["tools"]),
          ("tool_call_and_result", CASES["tool_call_and_result"]["tools"]),
          ("ipython_result_then_a_new_question", CASES["ipython_result_then_a_new_question"]["tools"]),
          ("tool_history_with_an_image_and_no_tools", CASES["tool_call_and_result"]["tools"])]


@pytest.fixture(scope="module")
def engine(home: Path):
    model = load_model(home / "models" / "tiny-a-text-F32.gguf", n_ctx=4096)
    yield ChatEngine(model, date_string=GOLDEN["date_string"])
    model.close()


@pytest.mark.parametrize("api", ["ollama", "openai"])
@pytest.mark.parametrize("name,tools", SERVED, ids=[name for name, _ in SERVED])
def test_requests_with_tools_become_the_prompts_hf_renders(home: Path, engine: ChatEngine,
                                                          monkeypatch: pytest.MonkeyPatch, api: str, name: str,
                                                          tools: list | None) -> None:
    monkeypatch.setenv("LVA_HOME", str(home))
    if api == "ollama":
        body = parse(ollama_api.ChatRequest, json.dumps(ollama_request(CASES[name], tools)).encode())
        work = asyncio.run(ollama_api.chat_work(body, Catalog("tiny-a"), Sampling()))
    else:
        body = parse(openai_api.ChatCompletionRequest, json.dumps(openai_request(CASES[name], tools)).encode())
        work = asyncio.run(openai_api.completion_work(body, Catalog("tiny-a"), Sampling()))
    ids, _, _ = engine.prompt(work.task, drop_turns=False)
    assert ids == CASES[name]["token_ids"]


# ---------------------------------------------------------------------------------------------- ollama-python

@pytest.fixture(scope="module")
def ollama_client(server: LvaServer) -> ollama.Client:
    return ollama.Client(host=server.url)


def test_ollama_python_gets_a_required_call_streamed_and_whole(ollama_client: ollama.Client) -> None:
    options = {**OLLAMA_OPTIONS, "tool_choice": "required"}
    whole = ollama_client.chat(model="tiny-a", messages=ASK, tools=TOOLS, options=options)
    [call] = whole.message.tool_calls
    assert_valid_call(call.function.name, call.function.arguments)
    assert whole.message.content == "" and whole.done_reason == "stop"
    chunks = list(ollama_client.chat(model="tiny-a", messages=ASK, tools=TOOLS, options=options, stream=True))
    calls = [c for chunk in chunks for c in chunk.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [(call.function.name, call.function.arguments)]
    assert chunks[-1].done and not chunks[-1].message.tool_calls and not any(c.message.content for c in chunks)


def test_ollama_python_gets_the_named_call_and_the_result_is_answered(ollama_client: ollama.Client) -> None:
    options = {**OLLAMA_OPTIONS, "tool_choice": NAMED}
    reply = ollama_client.chat(model="tiny-a", messages=ASK, tools=TOOLS, options=options)
    [call] = reply.message.tool_calls
    assert_valid_call(call.function.name, call.function.arguments, names=("current_time",))
    second = ASK + [reply.message, {"role": "tool", "content": "14:05", "tool_name": "current_time"}]
    answer = ollama_client.chat(model="tiny-a", messages=second, tools=TOOLS, options={"num_predict": 8, "seed": 1})
    assert answer.done and answer.done_reason in ("stop", "length") and answer.eval_count > 0
    assert answer.prompt_eval_count > 0


def test_without_tool_choice_a_noise_answer_stays_text(ollama_client: ollama.Client) -> None:
    """The tiny model does not write calls by itself: its answer comes back as content, unchanged by the tools."""
    with_tools = ollama_client.chat(model="tiny-a", messages=ASK, tools=TOOLS, options={"num_predict": 8, "seed": 1})
    assert not with_tools.message.tool_calls and with_tools.message.content
    chunks = list(ollama_client.chat(model="tiny-a", messages=ASK, tools=TOOLS, stream=True,
                                     options={"num_predict": 8, "seed": 1}))
    assert "".join(c.message.content for c in chunks) == with_tools.message.content


def test_a_call_the_model_writes_by_itself_is_read_and_other_json_stays_text(ollama_client: ollama.Client) -> None:
    """With tool_choice auto, an answer shaped as a call (here by a response format) comes back as a call; JSON
    that is not a call was held back while it streamed (it might have been one) and comes back as text."""
    shaped = {"type": "object", "required": ["name", "parameters"], "properties": {
        "name": {"const": "current_time"}, "parameters": CLOCK["function"]["parameters"]}}
    for stream in (False, True):
        chunks = ollama_client.chat(model="tiny-a", messages=ASK, tools=TOOLS, format=shaped, options=OLLAMA_OPTIONS,
                                    stream=stream)
        [call] = [c for chunk in (chunks if stream else [chunks]) for c in chunk.message.tool_calls or []]
        assert_valid_call(call.function.name, call.function.arguments, names=("current_time",))
    other = {"type": "object", "required": ["zone"], "properties": {"zone": {"type": "string", "enum": ["UTC"]}}}
    whole = ollama_client.chat(model="tiny-a", messages=ASK, tools=TOOLS, format=other, options=OLLAMA_OPTIONS)
    assert not whole.message.tool_calls and json.loads(whole.message.content) == {"zone": "UTC"}
    chunks = list(ollama_client.chat(model="tiny-a", messages=ASK, tools=TOOLS, format=other, options=OLLAMA_OPTIONS,
                                     stream=True))
    assert [c.message.content for c in chunks if c.message.content] == [whole.message.content]


# ---------------------------------------------------------------------------------------------- openai-python

@pytest.fixture(scope="module")
def openai_client(server: LvaServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0)


def test_openai_python_gets_a_required_call_streamed_and_whole(openai_client: openai.OpenAI) -> None:
    settings = dict(model="tiny-a", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200,
                    temperature=0.7, seed=3)
    whole = openai_client.chat.completions.create(**settings)
    choice = whole.choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.type == "function" and call.id.startswith("call_")
    assert_valid_call(call.function.name, json.loads(call.function.arguments))
    chunks = list(openai_client.chat.completions.create(**settings, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    [streamed] = [t for d in deltas for t in d.tool_calls or []]
    assert (streamed.function.name, json.loads(streamed.function.arguments)) == \
        (call.function.name, json.loads(call.function.arguments))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    assert deltas[0].role == "assistant" and not any(d.content for d in deltas)


def test_openai_python_gets_the_named_call_and_the_result_is_answered(openai_client: openai.OpenAI) -> None:
    reply = openai_client.chat.completions.create(model="tiny-a", messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                                  max_tokens=200, seed=5)
    [call] = reply.choices[0].message.tool_calls
    assert_valid_call(call.function.name, json.loads(call.function.arguments), names=("current_time",))
    second = ASK + [reply.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "14:05"}]
    for stream in (False, True):
        answer = openai_client.chat.completions.create(model="tiny-a", messages=second, tools=TOOLS, max_tokens=8,
                                                       seed=1, stream=stream)
        chunks = list(answer) if stream else [answer]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_tools_that_crowd_the_answer_out_are_left_out_unless_a_call_is_required(openai_client: openai.OpenAI) -> None:
    """Open WebUI sends 36 tools with every message. With tool_choice auto, tools whose prompt leaves less room
    than max_tokens (a quarter of the context without a limit) are left out; a required call keeps them."""
    many = [{"type": "function", "function": {"name": f"tool_{i}", "description": "Does one thing. " * 8,
                                              "parameters": {"type": "object", "properties": {}}}} for i in range(12)]
    plain = openai_client.chat.completions.create(model="tiny-a", messages=ASK, max_tokens=8, seed=1)
    shown = openai_client.chat.completions.create(model="tiny-a", messages=ASK, tools=many, max_tokens=8, seed=1)
    assert 3072 < shown.usage.prompt_tokens < 4096 - 8          # fits with room for 8 tokens: shown
    left_out = openai_client.chat.completions.create(model="tiny-a", messages=ASK, tools=many, seed=1,
                                                     max_tokens=2000)
    assert left_out.usage.prompt_tokens == plain.usage.prompt_tokens
    assert left_out.choices[0].finish_reason in ("stop", "length")
    unlimited = openai_client.chat.completions.create(model="tiny-a", messages=ASK, tools=many, seed=1, stop=["j"])
    none = openai_client.chat.completions.create(model="tiny-a", messages=ASK, tools=many, tool_choice="none",
                                                 max_tokens=8, seed=1)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens            # "none": never shown
    assert unlimited.usage.prompt_tokens == plain.usage.prompt_tokens      # less than a quarter of 4096 left
    required = openai_client.chat.completions.create(model="tiny-a", messages=ASK, tools=many, tool_choice="required",
                                                     max_tokens=2000, seed=1)
    assert required.usage.prompt_tokens == shown.usage.prompt_tokens
    assert required.choices[0].message.tool_calls[0].function.name.startswith("tool_")


# ---------------------------------------------------------------------------------------------- LangChain

@tool
def get_weather(city: Literal["Paris", "Rome"], unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """The weather now in a city."""
    return f"22 degrees {unit} in {city}"


@tool
def current_time(zone: Literal["UTC", "CET"]) -> str:
    """The time now in a time zone."""
    return f"14:05 {zone}"


LANGCHAIN_TOOLS = [get_weather, current_time]


def assert_valid_langchain_call(message: AIMessage, names: tuple[str, ...] = ("get_weather", "current_time")) -> dict:
    [call] = message.tool_calls
    assert call["name"] in names and not message.invalid_tool_calls
    {"get_weather": get_weather, "current_time": current_time}[call["name"]].args_schema.model_validate(call["args"])
    return call


def answer_the_call(model, message: AIMessage) -> AIMessage:
    """Run the tool the model called and send its result back: the second turn."""
    call = message.tool_calls[0]
    result = {"get_weather": get_weather, "current_time": current_time}[call["name"]].invoke(call["args"])
    return model.invoke([HumanMessage("What is the weather in Paris?"), message,
                         ToolMessage(result, tool_call_id=call["id"])])


@pytest.mark.parametrize("tool_choice", ["any", "current_time"])
def test_langchain_chat_openai_bind_tools_gets_calls_and_answers_the_result(server: LvaServer,
                                                                             tool_choice: str) -> None:
    llm = ChatOpenAI(model="tiny-a", base_url=f"{server.url}/v1", api_key="not-needed", max_tokens=200,
                     temperature=0.7, seed=3, max_retries=0)
    forced = llm.bind_tools(LANGCHAIN_TOOLS, tool_choice=tool_choice)
    names = ("current_time",) if tool_choice == "current_time" else ("get_weather", "current_time")
    message = forced.invoke("What is the weather in Paris?")
    call = assert_valid_langchain_call(message, names)
    streamed = None
    for chunk in forced.stream("What is the weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert (assert_valid_langchain_call(streamed, names)["args"], streamed.tool_calls[0]["name"]) == \
        (call["args"], call["name"])
    answer = answer_the_call(llm.bind_tools(LANGCHAIN_TOOLS), message)
    assert isinstance(answer.content, str)
    assert answer.response_metadata["finish_reason"] in ("stop", "length")


def test_langchain_chat_ollama_bind_tools_gets_calls_and_answers_the_result(server: LvaServer) -> None:
    """ChatOllama ignores bind_tools' tool_choice (Ollama has none); lva reads it from the options."""
    llm = ChatOllama(model="tiny-a", base_url=server.url)
    forced = llm.bind_tools(LANGCHAIN_TOOLS).bind(options={**OLLAMA_OPTIONS, "tool_choice": "required"})
    message = forced.invoke("What is the weather in Paris?")
    call = assert_valid_langchain_call(message)
    streamed = None
    for chunk in forced.stream("What is the weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert (streamed.tool_calls[0]["name"], streamed.tool_calls[0]["args"]) == (call["name"], call["args"])
    answer = answer_the_call(llm.bind_tools(LANGCHAIN_TOOLS).bind(options={"num_predict": 8, "seed": 1}), message)
    assert isinstance(answer.content, str)
    assert answer.response_metadata["done_reason"] in ("stop", "length")
