"""The swap-consistency filter against hand-made judge answers: agree, disagree, tie, garbage."""

from __future__ import annotations

import pytest

from huatuo_ray.rlmf.feedback import FeedbackStats, Judgement
from huatuo_ray.teacher.parsers import ParseError, parse_rating


def judge(first: str, second: str) -> Judgement:
    """x shown first gives answer ``first``; y shown first gives ``second``."""
    return Judgement(parse_rating(first), parse_rating(second))


def test_agreeing_orders_keep_a_preference_with_its_margin() -> None:
    j = judge("Rating A: 8; Rating B: 5", "Rating A: 4; Rating B: 9")  # x wins both times
    assert j.verdict() == "x"
    assert j.margin() == pytest.approx(((8 - 5) + (9 - 4)) / 2)
    j = judge("Rating A: 3; Rating B: 7", "Rating A: 6; Rating B: 2")  # y wins both times
    assert j.verdict() == "y" and j.margin() == pytest.approx(4.0)


def test_disagreeing_orders_keep_nothing() -> None:
    # The first slot wins each time: pure position bias.
    j = judge("Rating A: 9; Rating B: 6", "Rating A: 8; Rating B: 5")
    assert j.verdict() == "inconsistent" and j.margin() == 0.0
    assert j.first_slot_wins() == [True, True]


def test_a_tie_in_either_order_keeps_nothing() -> None:
    assert judge("Rating A: 7; Rating B: 7", "Rating A: 4; Rating B: 9").verdict() == "tie"
    assert judge("Rating A: 8; Rating B: 5", "Rating A: 6; Rating B: 6").verdict() == "tie"


def test_garbage_does_not_parse() -> None:
    with pytest.raises(ParseError):
        parse_rating("Both answers are fine, I cannot decide.")


def test_stats_consistency_and_position_bias() -> None:
    stats = FeedbackStats()
    stats.add(judge("Rating A: 8; Rating B: 5", "Rating A: 4; Rating B: 9"))  # kept: x
    stats.add(judge("Rating A: 9; Rating B: 6", "Rating A: 8; Rating B: 5"))  # inconsistent
    stats.add(judge("Rating A: 7; Rating B: 7", "Rating A: 4; Rating B: 9"))  # tie
    stats.add(None)  # an order never parsed
    s = stats.summary()
    assert (s["pairs"], s["kept"], s["inconsistent"], s["ties"], s["unparseable"]) == (
        4,
        1,
        1,
        1,
        1,
    )
    assert s["consistency_rate"] == pytest.approx(1 / 3, abs=1e-4)
    # Orders with a winner: kept (x first: first wins; y first: second wins), inconsistent
    # (first, first), tie pair's second order (x second wins: second). First slot won 3 of 5.
    assert s["position_bias_rate"] == pytest.approx(3 / 5)
