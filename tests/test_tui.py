"""The terminal app, driven by Textual's Pilot against the real tiny model (no mocks)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from textual import events
from textual.widgets import OptionList

from assistant import store
from assistant.chat.feature_cache import FeatureCache
from assistant.history import History
from assistant.tui.app import LvaApp
from assistant.tui.screens.chat import ChatScreen
from assistant.tui.screens.confirm import ConfirmScreen
from assistant.tui.screens.first_run import FirstRunScreen
from assistant.tui.screens.rename import RenameScreen
from assistant.tui.widgets.attachment_bar import AttachmentBar
from assistant.tui.widgets.chat_log import AssistantMessage, UserMessage
from assistant.tui.widgets.conversation_list import ConversationList
from assistant.tui.widgets.prompt_input import PromptInput, image_path_from_paste

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE = FIXTURES / "images" / "rgb_80x26.png"
SIZE = (120, 40)


def install_tiny_model() -> None:
    from convert.pipeline import convert

    convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), store.models_dir(), quant="F32", name="tiny-a",
            progress=False)


async def until(condition, seconds: float = 600.0) -> None:
    """Wait for the app's state (a screen, an answer's first words). The deadline only stops a hang: a machine
    whose cores are busy with other work can take minutes, and is slow, not wrong."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def ready(pilot) -> ChatScreen:
    """The chat screen once the model has loaded: waits for the load worker itself, however long a busy
    machine takes, and fails at once if the load failed."""
    await until(lambda: isinstance(pilot.app.screen, ChatScreen))        # start_chat starts the load with it
    await pilot.app.workers.wait_for_complete()
    assert pilot.app.engine is not None, [n.message for n in pilot.app._notifications]
    await pilot.pause()
    return pilot.app.screen


async def send(pilot, text: str) -> None:
    """Send `text` and wait for its whole answer. The prompt clears when the screen takes the message, in the
    step that starts the answer's worker; before that, `generating` is still False, as it is once done."""
    screen = pilot.app.screen
    prompt = screen.query_one(PromptInput)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")
    await until(lambda: prompt.text == "")
    await pilot.app.workers.wait_for_complete()
    assert not screen.generating
    await pilot.pause()


async def paste(pilot, text: str) -> None:
    pilot.app.screen.query_one(PromptInput).post_message(events.Paste(text))
    await pilot.pause()


def run(scenario) -> None:
    asyncio.run(scenario())


def run_chat(scenario) -> None:
    """The app with the tiny model installed, on its chat screen once the model has loaded."""
    install_tiny_model()

    async def main() -> None:
        app = LvaApp()
        async with app.run_test(size=SIZE) as pilot:
            await scenario(app, pilot, await ready(pilot))
    run(main)


def test_a_sent_message_streams_a_reply_that_is_kept():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        await send(pilot, "hello there")
        assert [m.text for m in screen.query(UserMessage)] == ["hello there"]
        assert len(screen.query(AssistantMessage)) == 1
        assert screen.query_one(PromptInput).text == ""
        messages = app.history.messages(screen.conversation_id)
        assert [m.role for m in messages] == ["user", "assistant"]
        assert messages[1].status in ("complete", "stopped")
        assert "context" in str(screen.query_one("#status").render())

    run_chat(scenario)


def test_an_answer_cut_at_max_tokens_is_a_notification():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        screen.conversation.sampling = screen.conversation.sampling.__class__(max_tokens=2)
        await send(pilot, "count to a hundred")
        assert [(n.title, "limit of 2 tokens" in n.message) for n in app._notifications] == [("Answer cut", True)]

    run_chat(scenario)


def test_up_recalls_the_last_prompt_and_ctrl_j_adds_a_line():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        await send(pilot, "first question")
        prompt = screen.query_one(PromptInput)
        await pilot.press("up")
        assert prompt.text == "first question"
        prompt.text = "a"
        prompt.move_cursor((0, 1))
        await pilot.press("ctrl+j", "b")
        assert prompt.text == "a\nb"

    run_chat(scenario)


def test_pasted_paths_attach_the_image_plain_quoted_with_spaces_and_as_file_uri(tmp_path):
    spaced = tmp_path / "my photos" / "a cat.png"
    spaced.parent.mkdir()
    shutil.copy(IMAGE, spaced)

    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        for pasted in (str(IMAGE), f"'{spaced}'", f'"{spaced}"', str(spaced).replace(" ", "\\ "),
                       spaced.as_uri()):
            await paste(pilot, pasted)
            assert screen.attachment == Path(str(spaced) if "cat" in pasted or "%20" in pasted else IMAGE)
            assert screen.query_one(AttachmentBar).has_class("-attached")
            assert screen.query_one(PromptInput).text == ""
        await pilot.press("f4")
        assert screen.attachment is None
        await paste(pilot, str(spaced))
        await send(pilot, "what is this?")
        user = screen.query_one(UserMessage)
        assert user.image is not None and screen.attachment is None
        stored = app_messages(pilot.app, screen.conversation_id)
        assert stored[0].image_id is not None

    run_chat(scenario)


def app_messages(app, conversation_id):
    return app.history.messages(conversation_id)


def test_ordinary_pasted_text_is_inserted():
    assert image_path_from_paste("hello world") is None
    assert image_path_from_paste("line one\nline two") is None
    assert image_path_from_paste("file:///tmp/a%20b.png") == Path("/tmp/a b.png")


def test_a_bad_image_path_is_a_notification_and_the_app_stays_alive(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")

    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        await paste(pilot, str(tmp_path / "missing.png"))
        await paste(pilot, str(not_an_image))
        screen.query_one(PromptInput).text = f"/image {tmp_path / 'nope.jpg'}"
        await pilot.press("enter")
        await pilot.pause()
        assert len(app._notifications) == 3
        assert all(n.severity == "error" for n in app._notifications)
        assert screen.attachment is None
        await send(pilot, "still here?")
        assert len(screen.query(AssistantMessage)) == 1

    run_chat(scenario)


def test_an_error_from_the_engine_is_a_one_line_notification_and_the_app_stays_alive():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        sampling = screen.conversation.sampling
        screen.conversation.sampling = sampling.__class__(max_tokens=app.model.n_ctx - 4)
        await send(pilot, "a message with no room left for its answer")
        [notification] = app._notifications
        assert notification.severity == "error" and notification.title == "Cannot answer"
        assert "the message is too long" in notification.message and "\n" not in notification.message
        screen.conversation.sampling = sampling
        await send(pilot, "still here?")
        kept = app.history.messages(screen.conversation_id)
        assert [(m.role, m.text) for m in kept[-2:]] == [("user", "still here?"), ("assistant", kept[-1].text)]
        assert kept[-1].status in ("complete", "stopped")

    run_chat(scenario)


def test_attaching_an_image_starts_the_encoder_and_sending_does_not_encode_again():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        await paste(pilot, str(IMAGE))
        await until(lambda: app.model.images_encoded == 1)          # before anything is sent
        await app.workers.wait_for_complete()
        await send(pilot, "what is in it?")
        assert app.model.images_encoded == 1
        assert screen.conversation.turns[0].image is not None          # the history's copy: the same pixels
        key, _ = app.model.encode_image(IMAGE)                       # an in-memory cache hit: still one run
        assert app.model.images_encoded == 1 and FeatureCache().load(key) is not None

    run_chat(scenario)


def test_removing_the_image_cancels_its_encode():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        with app.model_lock:                    # the model is busy, so the encode waits to start
            await paste(pilot, str(IMAGE))
            encodes = [w for w in screen.workers if w.group == "encode"]
            assert encodes and not encodes[0].is_cancelled
            await pilot.press("f4")
            assert encodes[0].is_cancelled and screen.attachment is None
        await app.workers.wait_for_complete()
        assert app.model.images_encoded == 0

    run_chat(scenario)


def test_esc_stops_an_answer_and_keeps_it_marked_stopped():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        screen.conversation.sampling = screen.conversation.sampling.__class__(max_tokens=3500)
        await paste(pilot, str(IMAGE))
        screen.query_one(PromptInput).text = "describe it at length"
        await pilot.press("enter")
        await until(lambda: screen.query(AssistantMessage) and screen.query_one(AssistantMessage).text)
        await pilot.press("escape")
        await until(lambda: not screen.generating)
        await app.workers.wait_for_complete()
        answer = app.history.messages(screen.conversation_id)[-1]
        assert answer.role == "assistant" and answer.status == "stopped"
        assert answer.text == screen.conversation.turns[-1].text != ""
        assert screen.query_one(AssistantMessage).has_class("-stopped")

    run_chat(scenario)


def test_quitting_mid_answer_keeps_the_partial_answer_and_closes_cleanly():
    """The app closes the model only once the answering worker has let go of it (it used to close it under a
    running decode, which crashed the process)."""
    kept: dict[str, object] = {}

    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        screen.conversation.sampling = screen.conversation.sampling.__class__(max_tokens=3500)
        await paste(pilot, str(IMAGE))
        screen.query_one(PromptInput).text = "describe it at length"          # a long answer, as esc's test
        await pilot.press("enter")
        await until(lambda: screen.query(AssistantMessage) and screen.query_one(AssistantMessage).text)
        kept["conversation"] = screen.conversation_id
        await pilot.press("ctrl+q")

    run_chat(scenario)
    answer = History().messages(kept["conversation"])[-1]
    assert answer.role == "assistant" and answer.status == "stopped" and answer.text


def test_conversations_switch_rename_delete_and_search():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        await send(pilot, "about apples")
        first = screen.conversation_id
        await pilot.press("ctrl+n")
        await send(pilot, "about bananas")
        second = screen.conversation_id
        sidebar = screen.query_one(ConversationList)
        assert sidebar.conversation_ids == [second, first]

        sidebar.query_one(OptionList).focus()
        sidebar.query_one(OptionList).highlighted = 1
        await pilot.press("enter")
        assert screen.conversation_id == first
        assert [m.text for m in screen.query(UserMessage)] == ["about apples"]

        await pilot.press("f2")
        assert isinstance(app.screen, RenameScreen)
        app.screen.query_one("Input").value = "Fruit talk"
        await pilot.press("enter")
        await pilot.pause()
        assert app.history.conversation(first).title == "Fruit talk"

        await pilot.press("ctrl+f")
        await pilot.press(*"bananas")
        await pilot.pause()
        assert sidebar.conversation_ids == [second]
        sidebar.query_one("Input").value = ""
        await pilot.pause()

        screen.query_one(PromptInput).focus()
        await pilot.press("f8")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert app.screen is screen and len(app.history.list_conversations()) == 2
        await pilot.press("f8")
        await pilot.press("y")
        await pilot.pause()
        assert [c.id for c in app.history.list_conversations()] == [second]
        assert sidebar.conversation_ids == [second]
        assert screen.conversation_id is None and not screen.query(UserMessage)
        assert app.screen is screen

    run_chat(scenario)


def test_ctrl_r_answers_again_and_ctrl_e_edits_the_last_message_in_the_history_too():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        await paste(pilot, str(IMAGE))
        await send(pilot, "first question")
        await send(pilot, "second question")
        before = app.history.messages(screen.conversation_id)
        assert [m.role for m in before] == ["user", "assistant", "user", "assistant"]
        old_answer = screen.conversation.turns[3]

        await pilot.press("ctrl+r")
        await until(lambda: not screen.generating)
        await app.workers.wait_for_complete()
        await pilot.pause()
        after = app.history.messages(screen.conversation_id)
        assert [m.id for m in after[:3]] == [m.id for m in before[:3]] and len(after) == 4
        assert screen.conversation.turns[3] is not old_answer
        assert after[3].text == screen.conversation.turns[3].text
        assert len(screen.query(AssistantMessage)) == 2

        await pilot.press("ctrl+e")
        prompt = screen.query_one(PromptInput)
        assert prompt.text == "second question" and prompt.has_class("-editing")
        await pilot.press("escape")
        assert screen.editing is None and prompt.text == "" and not prompt.has_class("-editing")

        await pilot.press("ctrl+e")
        prompt.text = "the question, edited"
        await pilot.press("enter")
        await until(lambda: not screen.generating)
        await app.workers.wait_for_complete()
        await pilot.pause()
        edited = app.history.messages(screen.conversation_id)
        assert [m.text for m in edited[:3]] == ["first question", before[1].text, "the question, edited"]
        assert len(edited) == 4 and edited[0].image_id is not None
        assert [m.text for m in screen.query(UserMessage)] == ["first question", "the question, edited"]
        assert [t.text for t in screen.conversation.turns[:3]] == [m.text for m in edited[:3]]
        assert screen.editing is None

    run_chat(scenario)


def test_reopening_the_app_restores_the_last_conversation_with_its_image():
    install_tiny_model()

    async def first_run():
        async with LvaApp().run_test(size=SIZE) as pilot:
            await ready(pilot)
            await paste(pilot, str(IMAGE))
            await send(pilot, "remember this picture")

    async def second_run():
        async with LvaApp().run_test(size=SIZE) as pilot:
            screen = await ready(pilot)
            (user,) = screen.query(UserMessage)
            assert user.text == "remember this picture"
            assert user.image is not None and user.image.is_file()
            assert user.image.name != IMAGE.name and user.image_name == IMAGE.name   # the store's copy, shown by name
            assert screen.conversation.turns[0].image == user.image
            await send(pilot, "and now?")
            assert History().messages(screen.conversation_id)[2].text == "and now?"

    asyncio.run(first_run())
    asyncio.run(second_run())


def test_without_a_model_the_first_run_screen_says_how_to_get_one():
    async def scenario():
        app = LvaApp()
        async with app.run_test(size=SIZE) as pilot:
            await until(lambda: isinstance(app.screen, FirstRunScreen) and app.screen.query("Markdown"))
            text = app.screen.query_one("Markdown").source
            assert "lva pull llama3.2-vision" in text
            assert "lva convert meta-llama/Llama-3.2-11B-Vision-Instruct" in text
            install_tiny_model()
            await pilot.press("r")
            await ready(pilot)

    run(scenario)


def test_help_lists_every_key_and_the_palette_has_the_actions():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        await pilot.press("f1")
        table = app.screen.query_one("DataTable")
        keys = {str(table.get_row_at(i)[0]) for i in range(table.row_count)}
        assert {"escape", "ctrl+n", "ctrl+o", "f2", "f8", "f3", "f5", "ctrl+r", "ctrl+e", "enter"} <= keys
        await pilot.press("escape")
        titles = {c.title for c in app.get_system_commands(screen)}
        assert {"New conversation", "Attach image", "Rename conversation", "Settings", "Models", "Regenerate",
                "Edit last message"} <= titles

    run_chat(scenario)


def test_settings_apply_to_the_open_conversation():
    async def scenario(app: LvaApp, pilot, screen: ChatScreen) -> None:
        await pilot.press("f5")
        settings = app.screen
        settings.query_one("#temperature").value = "0"
        settings.query_one("#max_tokens").value = "16"
        settings.query_one("#seed").value = "7"
        settings.query_one("#system-prompt").text = "Be brief."
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen is screen
        sampling = screen.conversation.sampling
        assert (sampling.temperature, sampling.max_tokens, sampling.seed) == (0.0, 16, 7)
        assert screen.conversation.system_prompt == "Be brief."
        await send(pilot, "hi")
        assert app.history.conversation(screen.conversation_id).system_prompt == "Be brief."

    run_chat(scenario)


def test_the_models_screen_lists_installed_models_and_switches():
    install_tiny_model()
    from convert.pipeline import convert

    async def scenario():
        app = LvaApp(model_path=store.resolve_model("tiny-a"))
        convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), store.models_dir(), quant="F32", name="tiny-b",
                progress=False)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            first_model = app.model
            await pilot.press("f3")
            options = app.screen.query_one(OptionList)
            assert options.option_count == 2
            options.focus()
            options.highlighted = 1
            await pilot.press("enter")
            await until(lambda: app.model is not first_model)
            assert app.model_path.name == "tiny-b-text-F32.gguf"

    run(scenario)
