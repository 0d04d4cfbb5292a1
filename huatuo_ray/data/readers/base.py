"""What every reader yields: a valid :class:`~huatuo_ray.dialogue.Dialogue` or a :class:`Reject`.

A reader never drops a row silently and never stops at a bad row: it yields a ``Reject`` naming
where the row was (``file:line`` or ``file#index``) and why, and goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from huatuo_ray.dialogue import Dialogue


@dataclass
class Reject:
    """A row that could not become a record. ``raw`` is a short excerpt for a human to look at."""

    where: str
    reason: str
    raw: str = ""

    def to_row(self) -> dict[str, str]:
        return {"where": self.where, "reason": self.reason, "raw": self.raw[:500]}


ReadResult = Iterator[Dialogue | Reject]
