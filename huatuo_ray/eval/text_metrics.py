"""Reference-based metrics for Chinese answers: BLEU-1..4, GLEU, ROUGE-1/2/L, Distinct-1/2.

Tokenisation is a stated choice: **characters** by default (whitespace dropped, punctuation kept:
each Chinese character is a token, as usual for Chinese generation metrics), or **words** with
jieba (``tokenize(text, "word")``, needs the ``jieba`` package).

Definitions (sentence level, then averaged over the set, as in the paper's table 2):

* BLEU-n: the *individual* n-gram score, brevity penalty x clipped n-gram precision for that n
  alone (nltk's ``sentence_bleu`` with weight 1 on n), 0 when no n-gram matches (no smoothing);
* GLEU: Google-BLEU (Wu et al., 2016), min(precision, recall) over all 1-4-grams pooled
  (nltk's ``sentence_gleu``);
* ROUGE-1/2: F1 of clipped n-gram overlap; ROUGE-L: F1 of the longest common subsequence
  (``rouge-score``'s definitions, run on the same tokens);
* Distinct-n (Li et al., 2016): distinct n-grams / all n-grams over every prediction of the set.

Tests check hand-computed values and agreement with nltk and rouge-score.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from huatuo_ray.data.similarity import lcs_length


def tokenize(text: str, level: str = "char") -> list[str]:
    if level == "char":
        return [ch for ch in text if not ch.isspace()]
    if level == "word":
        import jieba

        return [w for w in jieba.lcut(text) if w.strip()]
    raise ValueError(f"unknown tokenisation {level!r} (char or word)")


def ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _overlap(pred: Sequence[str], ref: Sequence[str], n: int) -> tuple[int, int, int]:
    """(clipped matches, predicted n-grams, reference n-grams)."""
    p, r = ngrams(pred, n), ngrams(ref, n)
    return sum((p & r).values()), sum(p.values()), sum(r.values())


def bleu_n(pred: Sequence[str], ref: Sequence[str], n: int) -> float:
    """Individual BLEU-n of one sentence against one reference."""
    matches, total, _ = _overlap(pred, ref, n)
    if not pred or total == 0 or matches == 0:
        return 0.0
    brevity = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return brevity * matches / total


def gleu(pred: Sequence[str], ref: Sequence[str], max_n: int = 4) -> float:
    matches = pred_total = ref_total = 0
    for n in range(1, max_n + 1):
        m, p, r = _overlap(pred, ref, n)
        matches, pred_total, ref_total = matches + m, pred_total + p, ref_total + r
    if pred_total == 0 or ref_total == 0:
        return 0.0
    return min(matches / pred_total, matches / ref_total)


def _f1(matches: int, pred_total: int, ref_total: int) -> float:
    if matches == 0:
        return 0.0
    precision, recall = matches / pred_total, matches / ref_total
    return 2 * precision * recall / (precision + recall)


def rouge_n(pred: Sequence[str], ref: Sequence[str], n: int) -> float:
    return _f1(*_overlap(pred, ref, n))


def rouge_l(pred: Sequence[str], ref: Sequence[str]) -> float:
    # lcs_length works on strings; tokens become private-use characters so words work too.
    vocab: dict[str, str] = {}
    encode = lambda toks: "".join(vocab.setdefault(t, chr(0xF0000 + len(vocab))) for t in toks)  # noqa: E731
    return _f1(lcs_length(encode(pred), encode(ref)), len(pred), len(ref))


def distinct_n(predictions: Sequence[Sequence[str]], n: int) -> float:
    seen: set[tuple[str, ...]] = set()
    total = 0
    for tokens in predictions:
        grams = ngrams(tokens, n)
        seen.update(grams)
        total += sum(grams.values())
    return len(seen) / total if total else 0.0


METRICS = (
    "BLEU-1",
    "BLEU-2",
    "BLEU-3",
    "BLEU-4",
    "GLEU",
    "ROUGE-1",
    "ROUGE-2",
    "ROUGE-L",
    "Distinct-1",
    "Distinct-2",
)


def score_corpus(
    predictions: Sequence[str], references: Sequence[str], level: str = "char"
) -> dict[str, float]:
    """All metrics of table 2 for a set of predictions against their references (x100)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in number")
    if not predictions:
        raise ValueError("nothing to score")
    preds = [tokenize(p, level) for p in predictions]
    refs = [tokenize(r, level) for r in references]
    sums = dict.fromkeys(METRICS[:8], 0.0)
    for p, r in zip(preds, refs):
        for n in range(1, 5):
            sums[f"BLEU-{n}"] += bleu_n(p, r, n)
        sums["GLEU"] += gleu(p, r)
        sums["ROUGE-1"] += rouge_n(p, r, 1)
        sums["ROUGE-2"] += rouge_n(p, r, 2)
        sums["ROUGE-L"] += rouge_l(p, r)
    scores = {k: 100 * v / len(preds) for k, v in sums.items()}
    scores["Distinct-1"] = 100 * distinct_n(preds, 1)
    scores["Distinct-2"] = 100 * distinct_n(preds, 2)
    return {k: round(v, 4) for k, v in scores.items()}
