"""Small helpers shared by the readers: input files, names for ``Reject.where`` and UTF-8 lines."""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Iterator
from typing import Any

from huatuo_ray import storage
from huatuo_ray.data.readers.base import Reject
from huatuo_ray.dialogue import Dialogue, RecordError


def input_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """``path`` itself, or the files directly inside the folder ``path`` whose names end in one of
    ``suffixes``, sorted by name."""
    if storage.is_dir(path):
        return [f for f in storage.list_files(path) if f.endswith(suffixes)]
    return [path]


def basename(path: str) -> str:
    """The file name of a local path or URI (what ``Reject.where`` starts with)."""
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def stem(path: str) -> str:
    """The file name without its last extension."""
    name = basename(path)
    return name.rsplit(".", 1)[0] if "." in name else name


def excerpt(obj: Any) -> str:
    """A short text form of a raw row, for ``Reject.raw``."""
    text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, default=str)
    return text[:500]


def utf8_lines(path: str) -> Iterator[tuple[int, str | None]]:
    """Stream ``(line number from 1, text)``; text is None for a line that is not valid UTF-8.

    A UTF-8 BOM is dropped and line ends (LF or CRLF) are removed.
    """
    with io.BufferedReader(storage.open_input(path)) as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield number, raw.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError:
                yield number, None


def read_json(path: str) -> Any:
    """A whole JSON file (UTF-8, BOM allowed). Invalid JSON raises ValueError naming the file."""
    try:
        return json.loads(storage.read_bytes(path).decode("utf-8-sig"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{basename(path)}: not a UTF-8 JSON file: {e}") from e


def text(value: Any) -> str:
    """A stripped string for str values, "" for anything else (None, numbers, lists)."""
    return value.strip() if isinstance(value, str) else ""


def checked(dialogue: Dialogue, where: str, raw: Any = "") -> Dialogue | Reject:
    """The dialogue if it passes ``validate()``, else a Reject with the validation message."""
    try:
        return dialogue.validate()
    except RecordError as e:
        return Reject(where, str(e), excerpt(raw))
