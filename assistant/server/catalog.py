"""The models a client can ask for: the store's pairs, plus a `--model PATH` outside the store.

A model is named `NAME-QUANT` (the columns of `lva models`); a request may also say just `NAME` when only
one quant of it exists, and Ollama clients' `:latest` tag is ignored. Clients never name files: a request
can only choose among these models.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from assistant import store
from assistant.store import MODEL_FILE, ModelNotFound, find_vision_file
from models.file_type import file_type_of
from models.gguf_header import read_header

FILE_TYPE = "general.file_type"


@dataclass(frozen=True)
class ServedModel:
    name: str                   # NAME-QUANT, as clients see it
    family_name: str            # NAME alone
    quant: str
    text: Path
    vision: Path | None

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in (self.text, self.vision) if p is not None)

    @property
    def modified_at(self) -> str:
        return rfc3339(self.text.stat().st_mtime)

    @property
    def digest(self) -> str:
        """Names the files as they are now (path, size, time), without reading gigabytes to hash them."""
        stats = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in (self.text, self.vision) if p is not None]
        return hashlib.sha256("\n".join(stats).encode()).hexdigest()

    def metadata(self) -> dict[str, str | int | float | bool]:
        """The text file's GGUF metadata, arrays (vocabulary, merges) left out, and general.file_type as its
        tensors say (what `lva import` once wrote there was Ollama's F16 for BF16 and F32 models too)."""
        header = read_header(self.text)
        return {**header.metadata, FILE_TYPE: int(file_type_of(header.tensors))}


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class Catalog:
    def __init__(self, choice: str | None = None) -> None:
        """`choice` is the command line's `--model` (a store name or a text GGUF path): it becomes the default
        model, and a file outside the store is served too. Raises ModelNotFound now, before the server starts."""
        self.extra: ServedModel | None = None
        self.default: str | None = None
        if choice:
            path = store.resolve_model(choice).resolve()
            served = next((m for m in self.models() if m.text.resolve() == path), None)
            if served is None:
                served = self.extra = _from_file(path)
            self.default = served.name
        else:
            try:
                self.default = _from_file(store.resolve_model(None)).name
            except ModelNotFound:                     # none, or several: requests must name one
                self.default = None

    def models(self) -> list[ServedModel]:
        """Read from the store on every call, so a model converted while the server runs shows up."""
        found = [ServedModel(f"{m.name}-{m.quant}", m.name, m.quant, m.text, m.vision)
                 for m in store.installed_models() if m.text is not None]
        return found + ([self.extra] if self.extra and self.extra.text.is_file() else [])

    def find(self, name: str | None) -> ServedModel:
        """The model a request names; no name means the default. ModelNotFound says which names exist."""
        name = (name or "").strip().removesuffix(":latest")
        models = self.models()
        if not name:
            if self.default is None:
                raise ModelNotFound("no model was named and there is no default; "
                                    f"the models are: {_names(models)}")
            name = self.default
        exact = [m for m in models if m.name == name]
        matches = exact or [m for m in models if m.family_name == name]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ModelNotFound(f"model {name!r} has several quants; name one of {_names(matches)}")
        raise ModelNotFound(f"model {name!r} not found; the models are: {_names(models)}")


def _names(models: list[ServedModel]) -> str:
    return ", ".join(m.name for m in models) or "none (convert one with `lva convert`)"


def _from_file(text: Path) -> ServedModel:
    match = MODEL_FILE.match(text.name)
    name, label = (match["name"], match["quant"]) if match and match["tower"] == "text" else (text.stem, "unknown")
    quant = store.stored_quant(text) or label
    return ServedModel(f"{name}-{quant}", name, quant, text, find_vision_file(text))
