"""Where lva keeps things: platformdirs' per-user folders, or everything under $LVA_HOME.

Models live in `<data>/models` as pairs `NAME-text-QUANT.gguf` + `NAME-vision-QUANT.gguf`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "lva"
MODEL_FILE = re.compile(r"^(?P<name>.+)-(?P<tower>text|vision)-(?P<quant>[A-Za-z0-9_]+)\.gguf$")


def data_dir() -> Path:
    home = os.environ.get("LVA_HOME")
    return Path(home) if home else Path(platformdirs.user_data_dir(APP_NAME))


def models_dir() -> Path:
    return data_dir() / "models"


@dataclass(frozen=True)
class InstalledModel:
    """A converted model in the store: its text file and, when present, its vision file."""

    name: str
    quant: str
    text: Path | None
    vision: Path | None

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in (self.text, self.vision) if p is not None)


def installed_models(directory: Path | None = None) -> list[InstalledModel]:
    """The model pairs in `directory` (default: the store), sorted by name then quant."""
    directory = directory or models_dir()
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for path in sorted(directory.glob("*.gguf")) if directory.is_dir() else []:
        match = MODEL_FILE.match(path.name)
        if match:
            found.setdefault((match["name"], match["quant"]), {})[match["tower"]] = path
    return [InstalledModel(name, quant, towers.get("text"), towers.get("vision"))
            for (name, quant), towers in sorted(found.items())]
