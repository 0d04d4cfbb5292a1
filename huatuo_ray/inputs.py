"""Errors a user can fix, and the check of a stage's inputs before it starts.

A :class:`UserError` is a mistake in what the stage was given (a missing input file, a model path
that does not exist, an input folder that is not a complete artifact, an unreachable Ray
address): the command line prints its one-line message and exits with code 2, with no traceback
unless ``--debug`` is given. Anything else is a bug and keeps its traceback.

:func:`check_inputs` walks a stage config for the fields marked ``input=`` (see
:func:`~huatuo_ray.config.option`) and refuses, before Ray starts, the first that is missing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any


class UserError(Exception):
    """A mistake the user can fix; its message is one line that says what and how."""


def _walk(config: Any, prefix: str = "") -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(dotted key, value, field metadata) of every input-marked field, lists included."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _walk(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from _walk(item, f"{key}[{i}].")
        elif f.metadata.get("input") and value:
            for item in value if isinstance(value, list) else [value]:
                yield key, item, dict(f.metadata)


def looks_local(path: str) -> bool:
    """Whether a model path is a local folder rather than a hub id (``org/name``)."""
    if "://" in path:
        return False
    if os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        return True
    return os.path.isdir(path.split("/")[0])  # "outputs/sft" where ./outputs exists


def missing_input(kind: str, path: str) -> str | None:
    """Why ``path`` cannot serve as an input of this kind, or None when it can."""
    from huatuo_ray import artifacts, storage

    if kind == "artifact":
        if not storage.exists(storage.join(path, artifacts.MANIFEST)):
            there = storage.exists(path)
            return "is not a complete artifact" if there else "does not exist"
    elif kind == "finished":
        if not artifacts.is_finished(path):
            there = storage.exists(path)
            return "is not a finished stage's output" if there else "does not exist"
    elif kind == "file":
        if not storage.exists(path):
            return "does not exist"
    elif kind == "model" and looks_local(path):
        if not os.path.isdir(path):
            return "is not a model folder" if os.path.exists(path) else "does not exist"
    return None


def check_inputs(config: Any) -> None:
    """Raise :class:`UserError` for the first input of ``config`` that is missing. A stage whose
    output is already complete needs none (it returns that output's manifest)."""
    output = getattr(config, "output", None)
    if isinstance(output, str) and output and missing_input("artifact", output) is None:
        return
    for key, path, meta in _walk(config):
        why = missing_input(meta["input"], str(path))
        if why is None:
            continue
        made_by = meta.get("made_by")
        fix = f"run `{made_by}` first, or check `{key}`" if made_by else f"check `{key}`"
        raise UserError(f"{path} {why}: {fix}")


def user_error_in(exc: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``exc``, also when Ray wrapped it (a task's or a worker's
    error comes back as its ``cause``)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None
