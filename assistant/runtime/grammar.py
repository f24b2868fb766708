"""Grammars that make the sampler write JSON: any JSON object, or one that follows a JSON schema.

llama.cpp constrains sampling with GBNF grammars; llama-cpp-python ships its JSON grammar and the
converter from JSON schema to GBNF (a port of llama.cpp's own), so both come from there.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp import llama_grammar

from models.errors import LvaError

class GrammarError(LvaError):
    """A JSON schema the converter cannot turn into a grammar; the message is one line."""


def json_grammar(schema: dict[str, Any] | None = None) -> str:
    """GBNF for a JSON object, or for JSON that follows `schema`."""
    if schema is None:
        return llama_grammar.JSON_GBNF
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001  (the converter reports bad schemas with asserts and lookups)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise GrammarError(f"the JSON schema cannot be used: {reason}") from None
