"""Integrated gradients over the shared sites (the "inputs" variant of EAP-IG, Hanna et al. 2024).

The token embeddings are moved along a straight line from the target run's to the source run's
(`e(alpha) = e_target + alpha (e_source - e_target)`, learned position embeddings too), and the
gradient of the metric with respect to every site's activation is averaged over `steps`
midpoints `alpha = (k + 1/2) / steps`. A site's score is `(a_source - a_target) . mean grad`.

Compared with AtP (one gradient, at the target end), the averaged gradient sees the
non-linearities between the two runs. Completeness: for the residual stream entering layer 0,
which is the interpolated quantity itself, the scores summed over positions converge to
`metric(source) - metric(target)` as `steps` grows (tested). For later sites the path is the
image of the input path, not a straight line in that site's activation, so IG there is a
heuristic estimate of the patching effect, like AtP. Cost: `steps` forward and backward passes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.attribution.atp import activation_grads, prepare, scores_from_grads
from interp.attribution.metrics import LogitDiff
from interp.attribution.patching import Direction
from interp.attribution.sites import Scores

EMBED_HOOKS = ("hook_embed", "hook_pos_embed")


def integrated_gradients(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: LogitDiff,
    site_families: str | Sequence[str] = ("resid", "attn", "mlp", "heads"),
    direction: Direction = "denoise",
    steps: int = 5,
) -> dict[str, Scores]:
    """IG scores per family (method `ig`); arguments as in `attribution_patching`.

    Args:
        steps: number of interpolation points (midpoint rule); >= 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    target, source, fams, names = prepare(model, clean_tokens, corrupt_tokens, metric,
                                          site_families, direction)
    embeds = [n for n in EMBED_HOOKS if n in model.hook_dict]
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in {*names, *embeds})
        _, target_cache = model.run_with_cache(target, names_filter=lambda n: n in {*names, *embeds})
        baseline = metric.on_model(model, target).mean().item()

    mean_grads = {n: torch.zeros_like(target_cache[n]) for n in names}
    for k in range(steps):
        alpha = (k + 0.5) / steps

        def interpolate(act, hook, alpha=alpha):
            start, end = target_cache[hook.name], source_cache[hook.name]
            return (start + alpha * (end - start)).requires_grad_(True)  # a leaf of the graph

        _, grads, _ = activation_grads(model, target, metric, names,
                                       fwd_hooks=[(n, interpolate) for n in embeds])
        for n in names:
            mean_grads[n] += grads[n] / steps
    deltas = {n: source_cache[n] - target_cache[n] for n in names}
    return scores_from_grads(model, fams, deltas, mean_grads, target, baseline, "ig")
