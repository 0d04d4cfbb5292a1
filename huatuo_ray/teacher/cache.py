"""A response cache in the output folder: a request is paid for once, whatever happens after.

The key is a hash of everything that decides the answer (model, messages, sampling settings and a
``variant`` number used to ask again on purpose). Each answer is its own small JSON file, written
atomically the moment it arrives, so a stage killed at any point and run again replays what it
already paid for. The folder may be remote (any pyarrow filesystem) so every Ray worker reaches it.
No secret ever goes in: the key and the stored record hold no headers and no API key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from huatuo_ray import storage


def request_key(model: str, messages: list[dict[str, str]], sampling: dict[str, Any]) -> str:
    canonical = json.dumps(
        {"model": model, "messages": messages, "sampling": sampling},
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """``get``/``put`` of answer records by request key, under ``uri/ab/abcdef....json``."""

    def __init__(self, uri: str):
        self.uri = uri

    def _path(self, key: str) -> str:
        return storage.join(self.uri, key[:2], key + ".json")

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            return json.loads(storage.read_bytes(path).decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # A damaged entry is treated as missing: the request is asked again and rewritten.
            return None

    def put(self, key: str, record: dict[str, Any]) -> None:
        storage.write_bytes(self._path(key), json.dumps(record, ensure_ascii=False).encode("utf-8"))
