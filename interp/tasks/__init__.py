"""Prompt datasets and metrics for patching studies: clean/corrupt pairs with answer tokens.

`ioi`: indirect-object identification (Wang et al. 2022) pairs and external pair files;
`PromptPairs.metric` gives the (normalised) logit-difference metric every method takes.
"""

from interp.tasks.ioi import PromptPairs, generate_ioi, load_pairs, logit_diff

__all__ = ["PromptPairs", "generate_ioi", "load_pairs", "logit_diff"]
