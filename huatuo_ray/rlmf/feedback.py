"""Mixed feedback: turning two orders of teacher ratings into one preference, or none.

The teacher rates responses A and B 1-10 (appendix B, "Rating A: x; Rating B: y") twice, with
their positions swapped. A judgement is kept only when both orders prefer the same response
strictly: a tie in either order, or orders that disagree, keep nothing (the pair says nothing
reliable about which is better). Both orders' ratings are stored with the preference.

``first`` / ``second`` below are positions in the prompt; ``x`` / ``y`` the two responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Winner = Literal["x", "y", "tie"]


@dataclass(frozen=True)
class Judgement:
    """Ratings of responses x and y from both orders: (x shown first) and (y shown first)."""

    x_first: tuple[float, float]  # (rating of x, rating of y) when x was Assistant A
    y_first: tuple[float, float]  # (rating of y, rating of x) when y was Assistant A

    def winner_x_first(self) -> Winner:
        x, y = self.x_first
        return "x" if x > y else "y" if y > x else "tie"

    def winner_y_first(self) -> Winner:
        y, x = self.y_first
        return "x" if x > y else "y" if y > x else "tie"

    def verdict(self) -> Winner | Literal["inconsistent"]:
        """The kept preference: "x" or "y" when both orders agree strictly, else why not."""
        a, b = self.winner_x_first(), self.winner_y_first()
        if a == "tie" or b == "tie":
            return "tie"
        return a if a == b else "inconsistent"

    def margin(self) -> float:
        """Mean rating gap (winner minus loser) over the two orders; 0 when nothing is kept."""
        gap_x = ((self.x_first[0] - self.x_first[1]) + (self.y_first[1] - self.y_first[0])) / 2
        verdict = self.verdict()
        return gap_x if verdict == "x" else -gap_x if verdict == "y" else 0.0

    def first_slot_wins(self) -> list[bool]:
        """For each order without a tie: did the response in the first slot win?"""
        out = []
        if (w := self.winner_x_first()) != "tie":
            out.append(w == "x")
        if (w := self.winner_y_first()) != "tie":
            out.append(w == "y")
        return out


@dataclass
class FeedbackStats:
    pairs: int = 0
    unparseable: int = 0  # a pair with an order whose answer never parsed
    kept: int = 0
    ties: int = 0
    inconsistent: int = 0
    first_slot_wins: int = 0
    decided_orders: int = 0

    def add(self, judgement: Judgement | None) -> None:
        self.pairs += 1
        if judgement is None:
            self.unparseable += 1
            return
        verdict = judgement.verdict()
        self.kept += verdict in ("x", "y")
        self.ties += verdict == "tie"
        self.inconsistent += verdict == "inconsistent"
        wins = judgement.first_slot_wins()
        self.first_slot_wins += sum(wins)
        self.decided_orders += len(wins)

    def summary(self) -> dict[str, float | int]:
        judged = self.pairs - self.unparseable
        return {
            **vars(self),
            # Share of pairs judged in both orders that gave a kept (consistent, strict) verdict.
            "consistency_rate": round(self.kept / judged, 4) if judged else 0.0,
            # How often the response shown first won, over orders that named a winner (0.5: none).
            "position_bias_rate": round(self.first_slot_wins / self.decided_orders, 4)
            if self.decided_orders
            else 0.0,
        }
