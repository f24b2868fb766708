"""Snapshot tests of the terminal app's screens (pytest-textual-snapshot), against the real tiny model.

Regenerate after a deliberate change of the look: `python -m pytest tests/test_tui_snapshots.py --snapshot-update`.
Nothing time- or machine-dependent is on screen: no message is sent (so no tok/s), the screens shown have no
paths or dates. The status bar names the device the model runs on, as the app shows it: the CPU in this
(CPU) build; a GPU build would name its device, so these snapshots belong to the CPU build.
"""

from __future__ import annotations

from pathlib import Path

from assistant.tui.app import LvaApp
from assistant.tui.screens.help import HelpScreen
from assistant.tui.screens.settings import SettingsScreen
from assistant.tui.widgets.attachment_bar import AttachmentBar
from assistant.tui.widgets.prompt_input import PromptInput
from assistant.tui.widgets.status_bar import StatusBar
from tests.test_tui import FIXTURES, install_tiny_model, paste, until
from tests.test_tui import ready as chat_ready

IMAGE = FIXTURES / "images" / "rgb_173x97.png"
SIZE = (120, 36)


async def ready(pilot):
    """The chat screen with the model loaded and the status bar naming its device; the input's cursor does
    not blink, so a snapshot never catches it half way (shown or hidden by the clock)."""
    screen = await chat_ready(pilot)
    screen.query_one(PromptInput).cursor_blink = False
    await until(lambda: screen.query_one(StatusBar).device == "CPU")
    await pilot.pause()
    return screen


def test_main_screen_with_an_image_attached(snap_compare):
    install_tiny_model()

    async def run_before(pilot) -> None:
        screen = await ready(pilot)
        await paste(pilot, str(IMAGE))
        await until(lambda: screen.attachment == Path(IMAGE) and screen.query_one(AttachmentBar).has_class("-attached"))
        await pilot.app.workers.wait_for_complete()     # the encode started by the paste: its progress bar gone
        prompt = screen.query_one(PromptInput)
        prompt.focus()                                    # the cursor is drawn where the input has focus
        await until(lambda: screen.focused is prompt)
        await pilot.pause()

    assert snap_compare(LvaApp(), terminal_size=SIZE, run_before=run_before)


def test_settings_screen(snap_compare):
    install_tiny_model()

    async def run_before(pilot) -> None:
        await ready(pilot)
        await pilot.press("f5")
        await until(lambda: isinstance(pilot.app.screen, SettingsScreen))
        await pilot.pause()

    assert snap_compare(LvaApp(), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare):
    install_tiny_model()

    async def run_before(pilot) -> None:
        await ready(pilot)
        await pilot.press("f1")
        await until(lambda: isinstance(pilot.app.screen, HelpScreen))
        await pilot.pause()

    assert snap_compare(LvaApp(), terminal_size=SIZE, run_before=run_before)
