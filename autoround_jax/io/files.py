"""Text and JSON metadata files read with one-line errors naming the file and the fault (binary, not UTF-8, invalid
JSON, the wrong kind of JSON value)."""

from __future__ import annotations

import json
from typing import Any

from .safetensors_io import CheckpointError


def read_text(path: str, what: str = "file") -> str:
    """A UTF-8 text file, or one line naming the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a {what}") from None
    if b"\x00" in raw[:8192]:
        raise CheckpointError(f"{path}: is a binary file, expected a UTF-8 {what}; pass the right file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}), expected a "
                              f"UTF-8 {what}; re-save it as UTF-8 or pass the right file") from None


def read_json(path: str, expect: type = dict, what: str = "JSON file") -> Any:
    """A JSON file that must hold an `expect` (dict: an object), or one line naming the file and the fault."""
    text = read_text(path, what)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno}); restore or "
                              "re-download the file") from None
    if expect is not None and not isinstance(obj, expect):
        kind = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise CheckpointError(f"{path}: expected {kind}, found {type(obj).__name__}; restore or re-download "
                              "the file")
    return obj
