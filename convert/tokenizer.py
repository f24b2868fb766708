"""The Llama 3 tokenizer as llama.cpp's `gpt2` / `llama-bpe` vocabulary.

The text file keeps the pure Llama vocabulary (`vocab_size` entries): `<|image|>` sits just past it
and reaches the model as an injected embedding, so any llama.cpp tool can run the text file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import TokenType

from convert.errors import ConvertError

@dataclass
class Vocabulary:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    pad_id: int | None
    pre: str = "llama-bpe"            # llama.cpp's pre-tokenizer: Llama 3's regex split


def read_vocabulary(tokenizer: dict[str, Any], tokenizer_config: dict[str, Any], vocab_size: int) -> Vocabulary:
    """Token strings, types and merges for ids 0..vocab_size-1, padded like convert_hf_to_gguf does."""
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError("tokenizer.json is not a byte-level BPE tokenizer (Llama 3's); cannot convert it")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special: set[int] = set()
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special", False):
            special.add(added["id"])
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if i in special else TokenType.NORMAL)
    ids = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str) -> int | None:
        value = tokenizer_config.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        return ids.get(content) if content else None

    return Vocabulary(
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        bos_id=special_id("bos_token"),
        eos_id=special_id("eos_token"),
        eot_id=ids.get("<|eot_id|>"),
        eom_id=ids.get("<|eom_id|>"),
        pad_id=special_id("pad_token"),
    )
