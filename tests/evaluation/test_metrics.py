import math

import pytest

from llmasos.evaluation import metrics


def test_squad_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert metrics.normalize_answer("  The  Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert metrics.normalize_answer("an apple a day") == "apple day"


def test_exact_match_takes_the_best_reference():
    assert metrics.exact_match("the Washington", ["Washington, D.C.", "Washington"]) == 1.0
    assert metrics.exact_match("Paris France", ["Paris"]) == 0.0


def test_token_f1_hand_computed():
    # pred tokens [new, york, city], ref [new, york]: common 2, precision 2/3, recall 1 -> F1 0.8
    assert metrics.token_f1("New York City", ["new york"]) == pytest.approx(0.8)
    # best of two references; no overlap scores 0; two empty answers agree
    assert metrics.token_f1("red car", ["blue car", "red car"]) == 1.0
    assert metrics.token_f1("dog", ["cat"]) == 0.0
    assert metrics.token_f1("the", ["a"]) == 1.0


def test_mean_and_its_standard_error():
    score = metrics.mean([1.0, 0.0, 1.0, 1.0])
    assert score.value == 0.75
    assert score.stderr == pytest.approx(math.sqrt(0.25 / 4))  # sample variance 1/4, n 4
    assert metrics.mean([1.0]).stderr is None


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    import sacrebleu

    hyps, refs = ["le chat est noir", "bonjour"], [["le chat est noir"], ["bonsoir"]]
    assert metrics.bleu(hyps, refs).value == pytest.approx(sacrebleu.corpus_bleu(hyps, [["le chat est noir", "bonsoir"]]).score)
    assert metrics.bleu(["le chat est noir"], [["le chat est noir"]]).value == pytest.approx(100.0)
    assert metrics.chrf(["abc"], [["xyz"]]).value == 0.0
    # a sample with fewer references repeats its first, which leaves its score as with one reference
    two = metrics.chrf(["le chat", "bonjour"], [["le chat", "un chat"], ["bonjour"]]).value
    references = [["le chat", "bonjour"], ["un chat", "bonjour"]]
    assert two == pytest.approx(sacrebleu.corpus_chrf(["le chat", "bonjour"], references).score)


def test_perplexity_is_exp_of_mean_negative_loglikelihood_per_token():
    assert metrics.perplexity([-2.0, -4.0], [1, 3]).value == pytest.approx(math.exp(6 / 4))
