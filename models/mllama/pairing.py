"""The id that ties a vision file to the text file it was converted with."""

from __future__ import annotations

from pathlib import Path

from models.gguf_header import read_header
from models.mllama import gguf_keys as K


def pair_id(path: Path) -> str | None:
    """The file's pair id, or None for a GGUF lva did not write (any llama.cpp text model); HeaderError for a
    file that is not a readable GGUF."""
    value = read_header(path).metadata.get(K.PAIR_ID)
    return None if value is None else str(value)
