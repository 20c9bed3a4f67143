"""Prompt datasets and metrics for patching studies: clean/corrupt pairs with answer tokens.

`ioi`: indirect-object identification (Wang et al. 2022) pairs, external pair files, and the
(normalised) logit-difference metric.
"""

from interp.tasks.ioi import (
    NormalisedLogitDiff,
    PromptPairs,
    generate_ioi,
    load_pairs,
    logit_diff,
    logit_diff_from_resid,
)

__all__ = [
    "NormalisedLogitDiff",
    "PromptPairs",
    "generate_ioi",
    "load_pairs",
    "logit_diff",
    "logit_diff_from_resid",
]
