"""The id that ties a vision file to the text file it was converted with."""

from __future__ import annotations

from pathlib import Path

import gguf

from models.mllama import gguf_keys as K


def pair_id(path: Path) -> str | None:
    """The file's pair id, or None for a GGUF lva did not write (any llama.cpp text model)."""
    field = gguf.GGUFReader(path).get_field(K.PAIR_ID)
    return None if field is None else str(field.contents())
