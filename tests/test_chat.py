"""The conversation engine on a real converted model: templates, KV reuse, the context window, stop, edit."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from assistant import load_model
from assistant.chat.engine import ChatEngine, ChatError, Conversation, Sampling
from assistant.chat.template import ChatTemplate, TemplateMessage
from convert.pipeline import convert

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE = FIXTURES / "images" / "rgb_173x97.png"
OTHER_IMAGE = FIXTURES / "images" / "rgb_80x26.png"
GREEDY = Sampling(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((FIXTURES / "mllama" / "tiny-a" / "reference.json").read_text())


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    return convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), tmp_path_factory.mktemp("tiny-a"),
                   quant="F32", progress=False)


@pytest.fixture()
def model(pair):
    m = load_model(pair.text, n_ctx=512, kv_cache_type="f32")
    yield m
    m.close()


def test_the_checkpoints_template_renders_the_prompts_hf_rendered(model, reference) -> None:
    template = ChatTemplate(model.chat_template, model.special_token_text(model.bos_token))
    prompts = {case["name"]: case["prompt"] for case in reference["cases"]}
    assert template.render([TemplateMessage("user", "Describe this image.", has_image=True)]) == \
        prompts["image_first.rgb_3x5"]
    chat = template.render([TemplateMessage("system", "Be brief."), TemplateMessage("user", "Why is the sky blue?")],
                           date_string="26 Jul 2024")
    assert chat == prompts["text_chat"]


def test_a_new_turn_evaluates_only_its_new_tokens_and_matches_one_whole_evaluation(model) -> None:
    engine = ChatEngine(model)
    conversation = Conversation(sampling=GREEDY)
    replies = []
    for text, image in (("Describe the image.", IMAGE), ("And the colors?", None), ("Anything else?", None)):
        "".join(engine.send(conversation, text, image, on_reply=replies.append))
    for before, after in zip(replies, replies[1:]):
        held = before.prompt_tokens + before.completion_tokens          # what the KV cache holds
        assert after.evaluated_tokens == after.prompt_tokens - held
    last_prompt = conversation.transcript[:replies[-1].prompt_tokens]
    incremental = model.next_token_logits(last_prompt, IMAGE)
    whole = model.logits(last_prompt, IMAGE)[-1]
    assert np.abs(incremental - whole).max() < 1e-4


def test_a_later_image_replaces_the_first_for_the_turns_after_it(model) -> None:
    engine = ChatEngine(model)
    conversation = Conversation(sampling=GREEDY)
    "".join(engine.send(conversation, "Describe the image.", IMAGE))
    "".join(engine.send(conversation, "And this one?", OTHER_IMAGE))
    ids, image, _ = engine.prompt(Conversation(turns=conversation.turns[:-1], sampling=GREEDY))
    assert image == OTHER_IMAGE
    assert ids.count(model.image_token_id) == 1            # only the last image is in the prompt


def test_when_the_context_is_full_the_oldest_turns_go_but_the_system_prompt_and_image_stay(pair) -> None:
    model = load_model(pair.text, n_ctx=160, kv_cache_type="f32")
    try:
        engine = ChatEngine(model)
        conversation = Conversation(system_prompt=None, sampling=Sampling(temperature=0.0, max_tokens=16))
        replies = []
        "".join(engine.send(conversation, "Describe the image.", IMAGE, on_reply=replies.append))
        for n in range(8):
            "".join(engine.send(conversation, f"Tell me more, part {n}, with detail.", on_reply=replies.append))
        assert any(reply.dropped_turns for reply in replies)
        ids, image, dropped = engine.prompt(Conversation(turns=conversation.turns[:-1],
                                                         sampling=conversation.sampling))
        assert dropped > 0 and image == IMAGE and model.image_token_id in ids
        assert len(ids) + conversation.sampling.max_tokens <= model.n_ctx
        assert len(conversation.turns) == 18                 # the engine keeps every turn; only the prompt drops
    finally:
        model.close()


def test_a_message_longer_than_the_context_is_a_one_line_error(pair) -> None:
    model = load_model(pair.text, n_ctx=64)
    try:
        with pytest.raises(ChatError) as caught:
            "".join(ChatEngine(model).send(Conversation(sampling=GREEDY), "word " * 200))
        assert "\n" not in str(caught.value)
    finally:
        model.close()


def test_stop_keeps_the_partial_answer_marked_stopped(model) -> None:
    engine = ChatEngine(model)
    conversation = Conversation(sampling=Sampling(temperature=0.0, max_tokens=64))
    replies, pieces = [], []
    for piece in engine.send(conversation, "Count to a hundred.", on_reply=replies.append):
        pieces.append(piece)
        if len(pieces) == 1:
            threading.Thread(target=engine.stop).start()
            threading.Event().wait(0.05)
    assert replies[-1].status == "stopped" and conversation.turns[-1].status == "stopped"
    assert replies[-1].done_reason == "stopped"
    assert conversation.turns[-1].text == "".join(pieces)
    assert replies[-1].completion_tokens < 64


def test_an_answer_cut_at_max_tokens_says_so(model) -> None:
    engine = ChatEngine(model)
    conversation = Conversation(sampling=Sampling(temperature=0.0, max_tokens=3))
    replies: list = []
    "".join(engine.send(conversation, "Count to a hundred.", on_reply=replies.append))
    assert (replies[-1].completion_tokens, replies[-1].done_reason) == (3, "length")
    assert replies[-1].status == "complete"


def test_regenerate_and_edit_answer_again_from_the_right_turn(model) -> None:
    engine = ChatEngine(model)
    conversation = Conversation(sampling=Sampling(temperature=1.0, max_tokens=8, seed=3))
    "".join(engine.send(conversation, "Describe the image.", IMAGE))
    "".join(engine.send(conversation, "More?"))
    first = conversation.turns[-1].text
    again = "".join(engine.regenerate(conversation))
    assert len(conversation.turns) == 4 and again == first          # same seed, same prompt: same answer
    "".join(engine.edit(conversation, 0, "What colours are there?"))
    assert [t.role for t in conversation.turns] == ["user", "assistant"]
    assert conversation.turns[0].text == "What colours are there?" and conversation.turns[0].image == IMAGE
    with pytest.raises(ChatError):
        engine.edit(conversation, 1, "not mine")


def test_a_plain_text_gguf_chats_without_images(pair, tmp_path: Path) -> None:
    alone = tmp_path / "plain.gguf"
    alone.write_bytes(pair.text.read_bytes())
    model = load_model(alone, n_ctx=256)
    try:
        engine = ChatEngine(model)
        conversation = Conversation(system_prompt="Be brief.", sampling=GREEDY)
        replies = []
        "".join(engine.send(conversation, "Hello", on_reply=replies.append))
        assert replies[-1].prompt_tokens > 0
        with pytest.raises(ChatError, match="no vision file"):
            engine.send(conversation, "And this?", IMAGE)
    finally:
        model.close()


def test_regenerate_and_edit_are_mirrored_in_the_history(model) -> None:
    from assistant.chat import saved
    from assistant.history import History

    history = History()
    engine = ChatEngine(model)
    conversation = Conversation(sampling=GREEDY)
    conversation_id = saved.start(history, conversation, "tiny-a", "test")
    for text, image in (("Describe the image.", IMAGE), ("More?", None)):
        pieces = engine.send(conversation, text, image, on_reply=(replies := []).append)
        saved.save_user_turn(history, conversation_id, conversation.turns[-1])
        "".join(saved.stream_answer(history, conversation_id, pieces, "tiny-a", GREEDY, replies))
    assert len(history.messages(conversation_id)) == 4
    saved.rewind(history, conversation_id, 3)                 # regenerate: the last answer goes
    pieces = engine.regenerate(conversation, on_reply=(replies := []).append)
    "".join(saved.stream_answer(history, conversation_id, pieces, "tiny-a", GREEDY, replies))
    stored = history.messages(conversation_id)
    assert [m.role for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[-1].text == conversation.turns[-1].text and stored[-1].status == "complete"
    restored = saved.load(history, conversation_id)
    assert [t.text for t in restored.turns] == [t.text for t in conversation.turns]
    assert restored.turns[0].image is not None and restored.turns[0].image.is_file()
    history.close()


def test_settings_changed_mid_conversation_are_kept_with_it() -> None:
    from assistant.chat import saved
    from assistant.history import History

    history = History()
    conversation = Conversation(sampling=GREEDY)
    conversation_id = saved.start(history, conversation, "tiny-a", "settings")
    conversation.system_prompt, conversation.sampling = "Be terse.", Sampling(temperature=0.3, seed=9)
    saved.save_settings(history, conversation_id, conversation)
    restored = saved.load(history, conversation_id)
    assert restored.system_prompt == "Be terse." and restored.sampling == conversation.sampling
    history.close()
