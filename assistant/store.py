"""Where lva keeps things: platformdirs' per-user folders, or everything under $LVA_HOME.

Models live in `<data>/models` as pairs `NAME-text-QUANT.gguf` + `NAME-vision-QUANT.gguf`. A model is
described by what its text file's tensors are stored in, which the QUANT in its file names may not say:
`lva import` once named pairs from Ollama's general.file_type, F16 for BF16 and F32 models too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import platformdirs

from models.errors import LvaError
from models.file_type import FileTypeError, quant_name, read_file_type

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
    label: str                  # the QUANT its file names carry
    text: Path | None
    vision: Path | None

    @property
    def quant(self) -> str:
        """What the text file's tensors are stored in (F32, BF16, Q4_K_M...); the label when it cannot be read."""
        return (stored_quant(self.text) if self.text else None) or self.label

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in (self.text, self.vision) if p is not None)


def installed_models(directory: Path | None = None) -> list[InstalledModel]:
    """The model pairs in `directory` (default: the store), paired and sorted by their file names."""
    directory = directory or models_dir()
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for path in sorted(directory.glob("*.gguf")) if directory.is_dir() else []:
        match = MODEL_FILE.match(path.name)
        if match:
            found.setdefault((match["name"], match["quant"]), {})[match["tower"]] = path
    return [InstalledModel(name, label, towers.get("text"), towers.get("vision"))
            for (name, label), towers in sorted(found.items())]


def stored_quant(path: Path) -> str | None:
    """What a GGUF file's tensors are stored in (F32, BF16, Q4_K_M...), or None for a file that is not a
    readable GGUF (or is gone)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _stored_quant(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _stored_quant(path: Path, size: int, mtime_ns: int) -> str | None:
    """Remembered per version of the file (its size and time): the server asks on every listing."""
    try:
        return quant_name(read_file_type(path))
    except FileTypeError:
        return None


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
    """The text GGUF to run: a path to a .gguf file, or a model name in the store (NAME, or NAME-QUANT with
    its type or its file names' label); without a choice, the only model in the store."""
    if choice and (choice.endswith(".gguf") or os.sep in choice):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise ModelNotFound(f"{path}: no such model file")
        return path
    models = [m for m in installed_models(directory) if m.text is not None]
    if choice:
        models = [m for m in models if choice in (m.name, f"{m.name}-{m.quant}", f"{m.name}-{m.label}")]
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
