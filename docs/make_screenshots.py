"""Make the SVG screenshots in docs/screenshots/ from the real app and the tiny test model.

Rerun from the repository root after changing the look:  python docs/make_screenshots.py
It uses a throwaway LVA_HOME (the tiny model from tests/fixtures is converted into it), so nothing of yours is touched.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshots"
IMAGE = ROOT / "tests" / "fixtures" / "images" / "rgb_173x97.png"
SIZE = (120, 36)


async def shoot() -> None:
    from assistant.tui.app import LvaApp
    from assistant.tui.screens import first_run
    from assistant.tui.screens.first_run import FirstRunScreen
    from assistant.tui.screens.help import HelpScreen
    from assistant.tui.screens.settings import SettingsScreen
    from tests.test_tui import install_tiny_model, paste, ready, send, until

    how_to = first_run.HOW_TO
    first_run.HOW_TO = how_to.replace("{models}", "~/.local/share/lva/models")  # not the throwaway temp path
    async with LvaApp().run_test(size=SIZE) as pilot:
        await until(lambda: isinstance(pilot.app.screen, FirstRunScreen))
        await pilot.pause()
        pilot.app.save_screenshot(filename="first-run.svg", path=str(OUT))
    first_run.HOW_TO = how_to

    install_tiny_model()
    async with LvaApp().run_test(size=SIZE) as pilot:
        await ready(pilot)
        await paste(pilot, str(IMAGE))
        await send(pilot, "What is in this picture?")
        pilot.app.save_screenshot(filename="main.svg", path=str(OUT))
        for key, screen, name in (("f5", SettingsScreen, "settings.svg"), ("f1", HelpScreen, "help.svg")):
            await pilot.press(key)
            await until(lambda: isinstance(pilot.app.screen, screen))
            await pilot.pause()
            pilot.app.save_screenshot(filename=name, path=str(OUT))
            await pilot.press("escape")
            await pilot.pause()


def main() -> None:
    sys.path.insert(0, str(ROOT))
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lva-screenshots-") as home:
        os.environ["LVA_HOME"] = home
        asyncio.run(shoot())
    print("wrote", ", ".join(sorted(p.name for p in OUT.glob("*.svg"))), "to", OUT)


if __name__ == "__main__":
    main()
