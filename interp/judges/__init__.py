"""Graders of model completions that need no hosted model: refusal (phrases and the refusal
score), similarity to a reference model's answers (BLEU, ROUGE-L), introspection trials
(rule-based), and an optional LLM judge at an OpenAI-compatible endpoint.

Every judge returns a `JudgeResult`: per-item verdicts with their inputs, rates with Wilson
intervals, means with t intervals, and `save(path)` to write them side by side.
"""

from interp.judges.base import Judge, JudgeResult, Mean, Rate, wilson_interval
from interp.judges.introspection import (
    FORCED_PREFILL,
    IntrospectionTrial,
    claims_detection,
    forced_identifies,
    identifies,
    judge_introspection,
)
from interp.judges.llm import LLMJudge, LLMJudgeError
from interp.judges.refusal import (
    REFUSAL_PHRASES,
    SubstringRefusalJudge,
    is_refusal,
    judge_refusal,
    refusal_agreement,
)
from interp.judges.similarity import bleu, judge_similarity, rouge_l

__all__ = [
    "FORCED_PREFILL", "REFUSAL_PHRASES", "IntrospectionTrial", "Judge", "JudgeResult",
    "LLMJudge", "LLMJudgeError", "Mean", "Rate", "SubstringRefusalJudge", "bleu",
    "claims_detection", "forced_identifies", "identifies", "is_refusal", "judge_introspection",
    "judge_refusal", "judge_similarity", "refusal_agreement", "rouge_l", "wilson_interval",
]
