"""Tests for interp.judges.similarity: BLEU and ROUGE-L against hand computations."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from scipy.stats import t as student_t

from interp.judges.similarity import bleu, bleu_tokens, judge_similarity, rouge_l


def test_identical_texts_score_one():
    text = "The capital of France is Paris, a city on the Seine."
    assert bleu(text, text) == pytest.approx(1.0)
    assert rouge_l(text, text) == pytest.approx(1.0)


def test_bleu_by_hand_with_method3_smoothing():
    # candidate "a b c d" vs reference "a b c e": clipped n-gram precisions 3/4, 2/3, 1/2 and
    # 0/1; method 3 replaces the k-th zero precision by 1 / (2^k * count) = 1/2. Equal lengths:
    # no brevity penalty. BLEU = geometric mean.
    expected = math.exp((math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4)
    assert bleu("a b c d", "a b c e") == pytest.approx(expected)
    # every n-gram matches, candidate 4 words vs reference 5: brevity penalty exp(1 - 5/4)
    assert bleu("a b c d", "a b c d e") == pytest.approx(math.exp(1 - 5 / 4))
    # no shared word at all: nltk returns 0 before any smoothing
    assert bleu("a b c d", "w x y z") == 0.0


def test_bleu_tokens_are_whitespace_words_with_case_and_punctuation():
    assert bleu_tokens("Paris.  It is\nbig") == ["Paris.", "It", "is", "big"]
    # "Paris." vs "paris": no unigram in common for BLEU, but ROUGE-L lowercases and drops
    # punctuation, so the two single-word texts are identical for it
    assert bleu("Paris.", "paris") < 0.5
    assert rouge_l("Paris.", "paris") == pytest.approx(1.0)


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" / "the cat lay on the rug" is "the cat on the" (4 words):
    # P = R = 4/6
    assert rouge_l("the cat sat on the mat", "the cat lay on the rug") == pytest.approx(4 / 6)
    # LCS "a c d": P = 3/4 (candidate), R = 3/6 (reference), F = 2PR / (P + R)
    p, r = 3 / 4, 3 / 6
    assert rouge_l("a b c d", "a x c y d z") == pytest.approx(2 * p * r / (p + r))


def test_empty_texts_score_zero():
    assert bleu("", "a b c") == 0.0 and bleu("a b c", "") == 0.0
    assert rouge_l("", "a b c") == 0.0


def test_judge_similarity_items_means_and_saved_inputs(tmp_path):
    completions = ["a b c d", "the cat sat on the mat", "x y z w"]
    references = ["a b c e", "the cat lay on the rug", "x y z w"]
    prompts = ["Q1", "Q2", "Q3"]
    res = judge_similarity(completions, references, prompts)
    b = [bleu(c, r) for c, r in zip(completions, references)]
    assert [it["bleu"] for it in res.items] == pytest.approx(b)
    assert res.means["bleu"].mean == pytest.approx(statistics.mean(b))
    sem = statistics.stdev(b) / math.sqrt(3)
    half = student_t.ppf(0.975, 2) * sem
    assert res.ci95 == pytest.approx((statistics.mean(b) - half, statistics.mean(b) + half))
    assert res.means["rouge_l"].mean == pytest.approx(statistics.mean(
        rouge_l(c, r) for c, r in zip(completions, references)))
    items_path, summary_path = res.save(tmp_path / "sim")
    rows = [json.loads(line) for line in items_path.read_text().splitlines()]
    assert [(r["prompt"], r["completion"], r["reference"]) for r in rows] == list(
        zip(prompts, completions, references))
    summary = json.loads(summary_path.read_text())
    assert summary["means"]["bleu"]["mean"] == pytest.approx(statistics.mean(b))


def test_judge_similarity_checks_lengths():
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        judge_similarity(["a", "b"], ["a"])
