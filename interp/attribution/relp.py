"""RelP (Relevance Patching, arXiv 2508.21258): attribution patching under LRP rules.

`relp(...)` is `attribution_patching(...)` run inside `lrp_rules(model, rules)`: the same two
forward passes and one backward pass, with the backward pass following the LRP rules in
`interp.attribution.lrp` (LN-rule, identity rule for element-wise activations, half rule for
gated products, optional attention rules). The forward pass, and so the metric and the
activation differences, are bit-identical to AtP's; only the gradient factor changes. With
`LRPRules.off()` RelP is AtP exactly (tested).
"""

from __future__ import annotations

from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.attribution.atp import attribution_patching
from interp.attribution.lrp import LRPRules, lrp_rules
from interp.attribution.metrics import MetricLike
from interp.attribution.patching import Direction
from interp.attribution.sites import FamilySpec, Scores


def relp(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    site_families: FamilySpec = ("resid", "attn", "mlp", "heads"),
    direction: Direction = "denoise",
    rules: LRPRules | None = None,
    method: str = "relp",
    batch_size: int | None = None,
) -> dict[str, Scores]:
    """RelP scores per family; arguments as in `attribution_patching`.

    Args:
        rules: the LRP rules (default `LRPRules.relp()`, the paper's set).
        method: the name recorded in the returned `Scores` (name rule variants differently).
        batch_size: run the prompts in chunks of this many (None: all at once), the same
            scores to rounding (as in `attribution_patching`).
    """
    with lrp_rules(model, rules if rules is not None else LRPRules.relp()):
        return attribution_patching(model, clean_tokens, corrupt_tokens, metric, site_families,
                                    direction, method=method, batch_size=batch_size)
