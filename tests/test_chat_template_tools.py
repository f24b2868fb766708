"""Prompts with tools, tool calls and tool results, token for token as HF transformers renders them.

tests/fixtures/tool_prompts.json holds what `apply_chat_template(messages, tools=...)` gave with the real Llama
3.2 Vision Instruct template and tiny-a's tokenizer (tests/fixtures/make_tool_prompts.py); here lva's template
code renders the same conversations and the converted model's tokenizer (llama.cpp's) tokenizes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assistant import load_model
from assistant.chat.template import TemplateMessage, ChatTemplate, ToolCall
from convert.pipeline import convert

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "tool_prompts.json").read_text())
CASES = {case["name"]: case for case in GOLDEN["cases"]}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    pair = convert(str(FIXTURES / GOLDEN["tokenizer"]), tmp_path_factory.mktemp("tiny-a"), quant="F32",
                   progress=False)
    m = load_model(pair.text, n_ctx=4096)
    yield m
    m.close()


def chat_message(message: dict) -> TemplateMessage:
    """An HF-style message dict as lva's template input."""
    content = message.get("content", "")
    calls = tuple(ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", []))
    if isinstance(content, str):
        return TemplateMessage(message["role"], content, tool_calls=calls)
    text = "".join(part["text"] for part in content if part["type"] == "text")
    return TemplateMessage(message["role"], text, has_image=any(part["type"] == "image" for part in content),
                       tool_calls=calls)


def test_the_golden_file_covers_the_tool_shapes() -> None:
    assert len(CASES) >= 4
    assert any(case["tools"] for case in CASES.values())
    assert any("tool_calls" in m for case in CASES.values() for m in case["messages"])
    assert {m["role"] for case in CASES.values() for m in case["messages"]} >= {"tool", "ipython"}
    assert any(case["variables"].get("tools_in_user_message") is False for case in CASES.values())


@pytest.mark.parametrize("name", list(CASES))
def test_tools_calls_and_results_render_and_tokenize_as_hf_does(model, name: str) -> None:
    case = CASES[name]
    template = ChatTemplate(model.chat_template, model.special_token_text(model.bos_token))
    prompt = template.render([chat_message(m) for m in case["messages"]], case["add_generation_prompt"],
                             tools=case["tools"], date_string=GOLDEN["date_string"], **case["variables"])
    assert prompt == case["prompt"]
    assert model.tokenize(prompt) == case["token_ids"]


def test_tool_schemas_keep_their_key_order_and_characters(model) -> None:
    """HF's `tojson`, not jinja's: jinja's would sort the keys and write `<` as `\\u003c`."""
    prompt = CASES["tools_in_user_message"]["prompt"]
    assert '"type": "object",\n            "properties"' in prompt
    assert "<as the station reports it> & rounded" in prompt and "'Köln'" in prompt
