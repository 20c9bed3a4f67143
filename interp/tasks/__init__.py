"""Prompt datasets and metrics for patching studies: clean/corrupt pairs with answer tokens.

`ioi`: indirect-object identification (Wang et al. 2022) pairs and external pair files;
`sva`: subject-verb agreement pairs (subject-number corruption, verb logit difference);
`PromptPairs.metric` gives the (normalised) logit-difference metric every method takes.
"""

from interp.tasks.ioi import PairsFileError, PromptPairs, generate_ioi, load_pairs, logit_diff
from interp.tasks.sva import generate_sva

__all__ = ["PairsFileError", "PromptPairs", "generate_ioi", "generate_sva", "load_pairs", "logit_diff"]
