"""Metrics: SQuAD-style exact match and token F1, BLEU and chrF through sacrebleu, accuracy, perplexity.

Per-sample metrics (exact match, F1, accuracy) report the mean and its standard error; corpus metrics
(BLEU, chrF, perplexity) have no per-sample form, so no standard error. Exact match, F1 and accuracy
are fractions in [0, 1]; BLEU and chrF are on sacrebleu's 0-100 scale.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass
class Score:
    value: float
    stderr: float | None = None


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, references: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """SQuAD's token F1 against the best-matching reference."""

    def f1(pred: list[str], ref: list[str]) -> float:
        if not pred or not ref:
            return float(pred == ref)
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(ref)
        return 2 * precision * recall / (precision + recall)

    pred = normalize_answer(prediction).split()
    return max(f1(pred, normalize_answer(r).split()) for r in references)


def mean(values: list[float]) -> Score:
    """The mean and its standard error (sample standard deviation / sqrt(n), as lm-eval reports)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return Score(m)
    return Score(m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n))


def _reference_streams(references: list[list[str]]) -> list[list[str]]:
    """sacrebleu wants one stream per reference slot; samples with fewer references repeat their first."""
    width = max(len(r) for r in references)
    return [[r[i] if i < len(r) else r[0] for r in references] for i in range(width)]


def bleu(predictions: list[str], references: list[list[str]]) -> Score:
    import sacrebleu

    return Score(sacrebleu.corpus_bleu(predictions, _reference_streams(references)).score)


def chrf(predictions: list[str], references: list[list[str]]) -> Score:
    import sacrebleu

    return Score(sacrebleu.corpus_chrf(predictions, _reference_streams(references)).score)


def perplexity(logprobs: list[float], tokens: list[int]) -> Score:
    """exp of the mean negative log-likelihood per token, over all samples' tokens together."""
    return Score(math.exp(-sum(logprobs) / sum(tokens)))


def generative_scores(metrics: list[str], predictions: list[str], references: list[list[str]]) -> dict[str, Score]:
    """The reference metrics of a generation, translation or QA task (perplexity is scored apart)."""
    per_sample = {"exact_match": exact_match, "f1": token_f1}
    corpus = {"bleu": bleu, "chrf": chrf}
    scores = {}
    for metric in metrics:
        if metric in per_sample:
            scores[metric] = mean([per_sample[metric](p, r) for p, r in zip(predictions, references)])
        elif metric in corpus:
            scores[metric] = corpus[metric](predictions, references)
    return scores
