"""Where lva keeps things: platformdirs' per-user folders, or everything under $LVA_HOME.

Models live in `<data>/models` as pairs `NAME-text-QUANT.gguf` + `NAME-vision-QUANT.gguf`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from models.errors import LvaError

APP_NAME = "lva"
MODEL_FILE = re.compile(r"^(?P<name>.+)-(?P<tower>text|vision)-(?P<quant>[A-Za-z0-9_]+)\.gguf$")


def data_dir() -> Path:
    home = os.environ.get("LVA_HOME")
    return Path(home) if home else Path(platformdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    """Things lva can always make again: encoded images, the measured speed of its kernels."""
    home = os.environ.get("LVA_HOME")
    return Path(home) / "cache" if home else Path(platformdirs.user_cache_dir(APP_NAME))


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


def find_vision_file(text_path: Path) -> Path | None:
    """The vision file written beside a text file by `lva convert` (NAME-text-Q.gguf -> NAME-vision-*.gguf)."""
    if "-text-" not in text_path.name:
        return None
    stem = text_path.name.rsplit("-text-", 1)[0]
    candidates = sorted(text_path.parent.glob(f"{stem}-vision-*.gguf"))
    return candidates[0] if candidates else None


class ModelNotFound(LvaError):
    """`--model` names nothing usable, or there is no single model to default to; one line for the user."""

    http_status = 404


def resolve_model(choice: str | None = None, directory: Path | None = None) -> Path:
    """The text GGUF to run: a path to a .gguf file, or a model name in the store (NAME or NAME-QUANT);
    without a choice, the only model in the store."""
    if choice and (choice.endswith(".gguf") or os.sep in choice):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise ModelNotFound(f"{path}: no such model file")
        return path
    models = [m for m in installed_models(directory) if m.text is not None]
    if choice:
        models = [m for m in models if choice in (m.name, f"{m.name}-{m.quant}")]
        if not models:
            raise ModelNotFound(f"no model named {choice!r} in {directory or models_dir()}; `lva models` lists them")
    if not models:
        raise ModelNotFound(f"no models in {directory or models_dir()}; get one with: lva pull llama3.2-vision "
                            "(or lva convert meta-llama/Llama-3.2-11B-Vision-Instruct)")
    if len(models) > 1:
        names = ", ".join(f"{m.name}-{m.quant}" for m in models)
        raise ModelNotFound(f"several models could run ({names}); choose one with --model")
    text = models[0].text
    assert text is not None                          # the models without one were left out above
    return text
