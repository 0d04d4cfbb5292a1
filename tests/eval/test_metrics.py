"""Chinese generation metrics: hand-computed values, and agreement with nltk and rouge-score."""

from __future__ import annotations

import math
import random

import pytest

from huatuo_ray.eval.text_metrics import (
    bleu_n,
    distinct_n,
    gleu,
    rouge_l,
    rouge_n,
    score_corpus,
    tokenize,
)

PRED, REF = tokenize("我头痛"), tokenize("我 头 很 痛")


def test_by_hand() -> None:
    brevity = math.exp(1 - 4 / 3)
    assert bleu_n(PRED, REF, 1) == pytest.approx(brevity)
    assert bleu_n(PRED, REF, 2) == pytest.approx(0.5 * brevity)
    assert bleu_n(PRED, REF, 3) == 0.0
    assert gleu(PRED, REF) == pytest.approx(0.4)  # 4 matches of 6 predicted, 10 reference n-grams
    assert rouge_n(PRED, REF, 1) == pytest.approx(6 / 7)
    assert rouge_n(PRED, REF, 2) == pytest.approx(0.4)
    assert rouge_l(PRED, REF) == pytest.approx(6 / 7)
    preds = [tokenize("我头痛"), tokenize("头痛头痛")]
    assert distinct_n(preds, 1) == pytest.approx(3 / 7)
    assert distinct_n(preds, 2) == pytest.approx(3 / 5)


def test_corpus_scores_are_means_times_100() -> None:
    scores = score_corpus(["我头痛", "我头痛"], ["我头很痛", "我头很痛"])
    assert scores["ROUGE-L"] == pytest.approx(100 * 6 / 7, abs=1e-3)
    assert scores["BLEU-4"] == 0.0 and set(scores) >= {"GLEU", "Distinct-2"}
    with pytest.raises(ValueError):
        score_corpus(["a"], [])


def random_pairs(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    alphabet = "头痛发热咳嗽建议休息多喝水医院检查"
    pairs = []
    for _ in range(n):
        ref = [rng.choice(alphabet) for _ in range(rng.randint(5, 30))]
        pred = [
            c if rng.random() < 0.7 else rng.choice(alphabet)
            for c in ref[: rng.randint(3, len(ref) + 5)]
        ]
        pairs.append((pred, ref))
    return pairs


def test_agrees_with_nltk() -> None:
    from nltk.translate.bleu_score import sentence_bleu
    from nltk.translate.gleu_score import sentence_gleu

    for pred, ref in random_pairs(50):
        for n in range(1, 5):
            weights = tuple(1.0 if i == n - 1 else 0.0 for i in range(4))
            expected = sentence_bleu([ref], pred, weights=weights) if len(pred) >= n else 0.0
            assert bleu_n(pred, ref, n) == pytest.approx(expected, abs=1e-9)
        assert gleu(pred, ref) == pytest.approx(sentence_gleu([ref], pred), abs=1e-9)


def test_agrees_with_rouge_score() -> None:
    from rouge_score import rouge_scorer

    class CharTokenizer:
        def tokenize(self, text: str) -> list[str]:
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CharTokenizer())
    for pred, ref in random_pairs(50, seed=1):
        s = scorer.score(" ".join(ref), " ".join(pred))
        assert rouge_n(pred, ref, 1) == pytest.approx(s["rouge1"].fmeasure, abs=1e-9)
        assert rouge_n(pred, ref, 2) == pytest.approx(s["rouge2"].fmeasure, abs=1e-9)
        assert rouge_l(pred, ref) == pytest.approx(s["rougeL"].fmeasure, abs=1e-9)
