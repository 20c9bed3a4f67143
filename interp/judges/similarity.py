"""Similarity of completions to a reference model's own answers: BLEU and ROUGE-L.

ConceptVectors (Hong et al., "Intrinsic evaluation of unlearning using parametric knowledge
traces", arXiv 2406.11614) measures what an edit (unlearning, noise on a concept vector) does
to a model by comparing its answers to the answers the *unedited* model gave to the same
questions: high similarity means the edit left the answer alone. This module scores each
completion against its reference with

- **BLEU**: `nltk.translate.bleu_score.sentence_bleu` with uniform 1- to 4-gram weights and
  `SmoothingFunction().method3` (NIST geometric smoothing: an n-gram order without matches
  counts as `1 / 2^k` instead of zeroing the score). Tokens are whitespace-separated words,
  `text.split()`, case and punctuation kept (so "Paris." and "Paris" differ), as the
  ConceptVectors code does (`calculate_bleu` in `Jailbreak/evaluate_util.py`).
- **ROUGE-L F**: `rouge_score.rouge_scorer.RougeScorer(["rougeL"])`, the F-measure of the
  longest common subsequence of words. Its tokenizer lowercases and keeps only letters and
  digits; no stemming. (ConceptVectors uses the older `rouge` package, which tokenises
  slightly differently; values are close but not identical.)

Differences from the ConceptVectors evaluation, to keep in mind when comparing numbers:

- Their `evaluate` decodes the *whole* generated sequence, prompt included, for both models,
  which adds the shared prompt to both sides and raises both scores; here only completions are
  compared (pass prompt + completion to both arguments to imitate them).
- Their call passes the edited model's answer as BLEU's reference and the original model's as
  the candidate. BLEU is asymmetric only through its brevity penalty (applied when the
  candidate is shorter than the reference); here the completion is the candidate and the
  reference model's answer the reference, the usual orientation, so a shortened (e.g.
  truncated) completion is penalised. Swap the arguments to reproduce theirs.
- An empty completion or reference scores 0 on both metrics, and so does a completion that
  shares no word with its reference (nltk returns 0 without a unigram match, before any
  smoothing; ROUGE's F is 0 without overlap).

Means come with Student t intervals (`interp.judges.base.Mean`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

from interp.judges.base import JudgeResult, Mean, check_lengths

__all__ = ["bleu", "bleu_tokens", "judge_similarity", "rouge_l"]


def bleu_tokens(text: str) -> list[str]:
    """Tokens for BLEU: whitespace-separated words, case and punctuation kept (ConceptVectors)."""
    return text.split()


@functools.cache
def _smoothing():  # type: ignore[no-untyped-def]
    from nltk.translate.bleu_score import SmoothingFunction

    return SmoothingFunction().method3


@functools.cache
def _rouge_scorer():  # type: ignore[no-untyped-def]
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def bleu(candidate: str, reference: str) -> float:
    """Sentence BLEU (1- to 4-grams, uniform weights, smoothing method 3) of `candidate`
    against one `reference`, on whitespace tokens. 0 when either is empty."""
    from nltk.translate.bleu_score import sentence_bleu

    hyp, ref = bleu_tokens(candidate), bleu_tokens(reference)
    if not hyp or not ref:
        return 0.0
    with warnings.catch_warnings():  # nltk warns about missing n-gram orders for short texts
        warnings.simplefilter("ignore", UserWarning)
        return float(sentence_bleu([ref], hyp, smoothing_function=_smoothing()))


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure of `candidate` against `reference` (`rouge-score`, no stemming)."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


def judge_similarity(
    completions: Sequence[str],
    references: Sequence[str],
    prompts: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> JudgeResult:
    """BLEU and ROUGE-L of each completion against the reference model's answer.

    Args:
        completions: answers of the model under test (e.g. after an edit).
        references: the reference (e.g. unedited) model's answers to the same prompts.
        prompts: the prompts, saved with the items.
        confidence: coverage of the t intervals of the means.

    Returns:
        A `JudgeResult` named "similarity" whose items hold `prompt`, `completion`,
        `reference`, `bleu` and `rouge_l`, with means `bleu` (primary) and `rouge_l`.
    """
    check_lengths("judge_similarity", completions, references=references, prompts=prompts)
    items = []
    for i, (c, r) in enumerate(zip(completions, references)):
        items.append({"prompt": None if prompts is None else prompts[i], "completion": c,
                      "reference": r, "bleu": bleu(c, r), "rouge_l": rouge_l(c, r)})
    return JudgeResult(
        "similarity", items,
        means={"bleu": Mean(tuple(it["bleu"] for it in items), confidence),
               "rouge_l": Mean(tuple(it["rouge_l"] for it in items), confidence)},
        config={"bleu": "nltk sentence_bleu, weights (0.25,)*4, SmoothingFunction().method3, "
                        "tokens text.split()",
                "rouge_l": "rouge_score RougeScorer(['rougeL']) fmeasure, use_stemmer=False"},
        primary="bleu",
    )
