"""What the readers share: input files, names for ``Reject.where``, the row loops of JSON arrays
and of line-per-row files, and the check that an id is not read twice."""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass
class Line:
    """A non-blank UTF-8 line of an input file, with the ``file:line`` a Reject of it names."""

    file: str
    number: int
    where: str
    text: str


def nonblank_lines(path: str, suffixes: tuple[str, ...]) -> Iterator[Line | Reject]:
    """The non-blank lines of ``path`` (or of its files ending in ``suffixes``), in order; a line
    that is not UTF-8 is a Reject ``line is not UTF-8``."""
    for file in input_files(path, suffixes):
        name = basename(file)
        for number, content in utf8_lines(file):
            where = f"{name}:{number}"
            if content is None:
                yield Reject(where, "line is not UTF-8")
            elif content.strip():
                yield Line(file, number, where, content)


@dataclass
class Item:
    """An item of a JSON array file, with the ``file#index`` a Reject of it names."""

    file: str
    index: int
    where: str
    value: Any


def json_array_items(path: str, what: str) -> Iterator[Item]:
    """The items of the JSON array in ``path`` (or in each of its ``.json`` files), in order. A
    file holding anything but an array raises ValueError "expected a JSON array of ``what``"."""
    for file in input_files(path, (".json",)):
        name, data = basename(file), read_json(file)
        if not isinstance(data, list):
            raise ValueError(f"{name}: expected a JSON array of {what}")
        for i, value in enumerate(data):
            yield Item(file, i, f"{name}#{i}", value)


def json_objects(path: str, what: str) -> Iterator[Item | Reject]:
    """:func:`json_array_items`, with an item that is not an object a Reject of its own."""
    for item in json_array_items(path, what):
        if isinstance(item.value, dict):
            yield item
        else:
            yield Reject(item.where, "a row must be a JSON object", excerpt(item.value))


def object_records(
    path: str, what: str, record: Callable[[Item, FirstSeen], Dialogue | Reject]
) -> Iterator[Dialogue | Reject]:
    """``record(item, seen)`` for each object of the JSON arrays in ``path`` (``seen``: the ids
    read so far, in any of its files); an item that is not an object is a Reject."""
    seen = FirstSeen()
    for item in json_objects(path, what):
        yield item if isinstance(item, Reject) else record(item, seen)


class FirstSeen:
    """Where each record id was first read, so that a row repeating one becomes a Reject naming
    both places."""

    def __init__(self, what: str = "id") -> None:
        self.what = what
        self.where: dict[str, str] = {}

    def repeat(self, key: str, where: str, raw: str = "", shown: Any = None) -> Reject | None:
        """None the first time ``key`` is seen (it is recorded at ``where``); a Reject
        ``duplicate {what} {shown or key} (first at ...)`` each later time."""
        if key in self.where:
            shown = key if shown is None else shown
            return Reject(where, f"duplicate {self.what} {shown} (first at {self.where[key]})", raw)
        self.where[key] = where
        return None


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
