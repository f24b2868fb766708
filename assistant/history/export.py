"""A kept conversation as a readable Markdown transcript, or as JSON that another lva imports whole.

JSON format ("lva-conversation", version 1), an object with no database ids:
    {"format": "lva-conversation", "version": 1,
     "title", "created_at", "updated_at", "system_prompt", "model": str | null (times ISO 8601),
     "sampling": object | null, "image": sha256 | null,
     "messages": [{"role": "system" | "user" | "assistant", "text", "image": sha256 | null, "created_at",
                   "prompt_tokens", "completion_tokens", "seconds", "model", "sampling",
                   "status": "complete" | "stopped" | "error"}, ...],
     "images": {sha256: {"name", "format", "mime", "width", "height", "bytes",
                         "data": base64 of the file (only when exported with include_images=True)}}}

An import checks everything (every field's type, every image's bytes against its sha256) before it writes
anything, and says what is wrong in one line naming the field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from assistant.history.store import (ROLES, STATUSES, History, HistoryError, StoredConversation, StoredImage,
                                     StoredMessage, describe_image, stored_time)

EXPORT_FORMAT = "lva-conversation"
EXPORT_VERSION = 1


def export_markdown(history: History, conversation_id: int) -> str:
    """A readable transcript: a heading per turn, images as links to the stored copies."""
    conversation, messages, images = history.snapshot(conversation_id)
    lines = [f"# {conversation.title or 'Untitled conversation'}", ""]
    about = [f"Started {conversation.created_at:%Y-%m-%d %H:%M} UTC"]
    if conversation.model:
        about.append(f"model {conversation.model}")
    lines += [f"*{' · '.join(about)}*", ""]
    if conversation.image_id:
        lines += [_markdown_image(history, images[conversation.image_id]), ""]
    if conversation.system_prompt:
        lines += ["**System prompt**", "", *(f"> {line}" for line in conversation.system_prompt.splitlines()), ""]
    for message in messages:
        lines += [f"## {message.role.capitalize()}", ""]
        if message.image_id:
            lines += [_markdown_image(history, images[message.image_id]), ""]
        lines += [message.text, ""]
        if note := _message_note(message):
            lines += [f"*{note}*", ""]
    return "\n".join(lines)


def export_json(history: History, conversation_id: int, include_images: bool = False) -> dict[str, Any]:
    """The conversation as "lva-conversation" version 1 (see the module docstring): JSON types only.

    Images are referenced by sha256 and described under "images"; with `include_images` their bytes
    come along as base64, so the export alone is enough to restore them on another machine.
    """
    conversation, messages, images = history.snapshot(conversation_id)
    return {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "title": conversation.title,
        "created_at": conversation.created_at.isoformat(), "updated_at": conversation.updated_at.isoformat(),
        "system_prompt": conversation.system_prompt, "model": conversation.model,
        "sampling": conversation.sampling, "image": conversation.image_id,
        "messages": [{"role": m.role, "text": m.text, "image": m.image_id, "created_at": m.created_at.isoformat(),
                      "prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
                      "seconds": m.seconds, "model": m.model, "sampling": m.sampling, "status": m.status}
                     for m in messages],
        "images": {sha: _exported_image(history, image, include_images) for sha, image in images.items()},
    }


def import_json(history: History, data: Mapping[str, Any] | str | bytes,
                images_dir: str | os.PathLike[str] | None = None) -> StoredConversation:
    """Add an `export_json` conversation (a dict or its JSON text) as a new one, keeping its timestamps.

    Each image comes from its embedded data, from this store if already there, or from `images_dir`
    (another lva's images folder, or a folder holding the originals under their names); its bytes must
    match its sha256. Everything is checked before anything is written.
    """
    record = _parse_export(data)
    referenced = {sha for sha in [record["image"], *(m["image"] for m in record["messages"])] if sha}
    missing = {sha: _image_to_import(history, sha, record["images"].get(sha, {}), images_dir)
               for sha in sorted(referenced)}
    for sha, image in missing.items():
        if image is not None:
            history.add_image(image, record["images"].get(sha, {}).get("name"))
    return history.restore(record)


# --- export ---

def _markdown_image(history: History, image: StoredImage) -> str:
    return f"![{image.name or image.id[:12]}]({(history.images_dir / image.relative_path).resolve().as_uri()})"


def _message_note(message: StoredMessage) -> str:
    """The line under a turn in the Markdown export: how it ended and what it cost."""
    notes = {"stopped": ["stopped before the end"], "error": ["failed"]}.get(message.status, [])
    if message.completion_tokens is not None:
        notes.append(f"{message.completion_tokens} tokens")
    if message.seconds is not None:
        notes.append(f"{message.seconds:.1f} s")
    return " · ".join(notes)


def _exported_image(history: History, image: StoredImage, include_data: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": image.name, "format": image.format, "mime": image.mime,
                             "width": image.width, "height": image.height, "bytes": image.bytes}
    if include_data:
        path = history.images_dir / image.relative_path
        try:
            entry["data"] = base64.b64encode(path.read_bytes()).decode("ascii")
        except FileNotFoundError:
            raise HistoryError(f"image {image.name or image.id} is missing from {history.images_dir}") from None
    return entry


# --- import: the images ---

def _image_to_import(history: History, sha: str, entry: Mapping[str, Any],
                     images_dir: str | os.PathLike[str] | None) -> bytes | None:
    """The bytes of image `sha`, from the export entry or `images_dir`; None if the store has it already."""
    name = entry.get("name")
    if entry.get("data") is not None:
        try:
            data = base64.b64decode(entry["data"], validate=True)
        except binascii.Error:
            raise HistoryError(f"import: images[{sha[:12]}…].data is not base64") from None
    else:
        if history.has_image_file(sha):
            return None
        data = _find_image(sha, name, images_dir)
    if hashlib.sha256(data).hexdigest() != sha:
        raise HistoryError(f"import: image {name or sha[:12]} does not match its sha256")
    describe_image(data, name)     # not an image: refuse now, before anything is written
    return data


def _find_image(sha: str, name: str | None, images_dir: str | os.PathLike[str] | None) -> bytes:
    """Image `sha` from `images_dir`: by content address (another lva's store) or by its original name."""
    if images_dir is not None:
        folder = Path(images_dir)
        candidates = [*folder.glob(f"{sha[:2]}/{sha}.*"), *([folder / name] if name else [])]
        for candidate in candidates:
            if candidate.is_file():
                data = candidate.read_bytes()
                if hashlib.sha256(data).hexdigest() == sha:
                    return data
    raise HistoryError(f"import: image {name or sha[:12]} is not embedded and not found "
                       f"{'in ' + str(images_dir) if images_dir is not None else '(pass images_dir)'}")


# --- import: checking the record ---

NULL = type(None)
TYPE_NAMES = {str: "text", int: "an integer", float: "a number", dict: "an object", list: "a list", NULL: "null"}
CONVERSATION_FIELDS: dict[str, tuple[type, ...]] = {
    "title": (str, NULL), "created_at": (str, NULL), "updated_at": (str, NULL), "system_prompt": (str, NULL),
    "model": (str, NULL), "sampling": (dict, NULL), "image": (str, NULL), "messages": (list,),
    "images": (dict, NULL)}
MESSAGE_FIELDS: dict[str, tuple[type, ...]] = {
    "role": (str,), "text": (str,), "image": (str, NULL), "created_at": (str, NULL),
    "prompt_tokens": (int, NULL), "completion_tokens": (int, NULL), "seconds": (int, float, NULL),
    "model": (str, NULL), "sampling": (dict, NULL), "status": (str, NULL)}
IMAGE_FIELDS: dict[str, tuple[type, ...]] = {"name": (str, NULL), "data": (str, NULL)}


def _parse_export(data: Mapping[str, Any] | str | bytes) -> dict[str, Any]:
    """Check an export against version 1 and normalise it; any problem is a HistoryError naming the field."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise HistoryError(f"import: not JSON ({error})") from None
    if not isinstance(data, Mapping):
        raise HistoryError("import: expected a JSON object")
    if data.get("format") != EXPORT_FORMAT:
        raise HistoryError(f"import: not an lva conversation (format {data.get('format')!r}, "
                           f"expected {EXPORT_FORMAT!r})")
    if data.get("version") != EXPORT_VERSION:
        raise HistoryError(f"import: unsupported {EXPORT_FORMAT} version {data.get('version')!r} "
                           f"(this lva reads version {EXPORT_VERSION})")
    record = _checked_fields(data, "conversation", CONVERSATION_FIELDS)
    record["created_at"] = _timestamp(record["created_at"], "created_at")
    record["updated_at"] = _timestamp(record["updated_at"], "updated_at")
    record["messages"] = [_parsed_message(message, f"messages[{index}]")
                          for index, message in enumerate(record["messages"])]
    record["images"] = {sha: _checked_fields(entry, f"images[{sha[:12]}]", IMAGE_FIELDS)
                        for sha, entry in (record["images"] or {}).items()}
    for sha in [record["image"], *(m["image"] for m in record["messages"]), *record["images"]]:
        if sha is not None and not (len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise HistoryError(f"import: image id {sha[:70]!r} is not a sha256 hex digest")
    return record


def _parsed_message(message: Any, where: str) -> dict[str, Any]:
    parsed = _checked_fields(message, where, MESSAGE_FIELDS)
    parsed["status"] = parsed["status"] or "complete"
    for what, choices in (("role", ROLES), ("status", STATUSES)):
        if parsed[what] not in choices:
            raise HistoryError(f"import: {where}.{what} must be one of {', '.join(choices)}, "
                               f"not {parsed[what]!r}")
    parsed["created_at"] = _timestamp(parsed["created_at"], f"{where}.created_at")
    return parsed


def _checked_fields(record: Any, where: str, spec: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """The fields of `spec` from `record`, each of one of its types (a missing key reads as null)."""
    if not isinstance(record, Mapping):
        raise HistoryError(f"import: {where} should be an object, not {_type_name(record)}")
    checked = {}
    for key, kinds in spec.items():
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, kinds):     # bool is an int to Python
            expected = " or ".join(TYPE_NAMES[kind] for kind in kinds)
            raise HistoryError(f"import: {where}.{key} should be {expected}, not {_type_name(value)}")
        checked[key] = value
    return checked


def _type_name(value: Any) -> str:
    return "true/false" if isinstance(value, bool) else TYPE_NAMES.get(type(value), type(value).__name__)


def _timestamp(value: str | None, where: str) -> str:
    """An ISO 8601 time as the history stores it; none given means now, no zone means UTC."""
    if value is None:
        return stored_time()
    try:
        return stored_time(datetime.fromisoformat(value))
    except ValueError:
        raise HistoryError(f"import: {where} is not an ISO 8601 time: {value[:40]!r}") from None
