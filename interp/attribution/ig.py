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

`path="activations"` is the other common variant (Marks et al. 2024's sparse feature circuits;
"activations" in EAP-IG): for each hook point in turn, that activation alone is moved along the
straight line from its target to its source value, everything downstream recomputed, and the
gradient there averaged over the same midpoints. Then the scores of one hook point sum to that
hook point's own line integral, so they converge to the effect of patching all of its sites
together (completeness per hook point, tested). The `steps` points run as one batch per hook
point: cost `n_hook_points` forward and backward passes on `steps` times the batch.
"""

from __future__ import annotations

from typing import Literal

import einops
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.attribution.atp import activation_grads, in_prompt_chunks, make_scores, prepare, site_values
from interp.attribution.metrics import Metric, MetricLike
from interp.attribution.patching import Direction
from interp.attribution.sites import FamilySpec, Scores, site_config
from interp.hooks import patch

EMBED_HOOKS = ("hook_embed", "hook_pos_embed")


def integrated_gradients(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    site_families: FamilySpec = ("resid", "attn", "mlp", "heads"),
    direction: Direction = "denoise",
    steps: int = 5,
    path: Literal["inputs", "activations"] = "inputs",
    method: str = "ig",
    batch_size: int | None = None,
) -> dict[str, Scores]:
    """IG scores per family; arguments as in `attribution_patching`.

    Args:
        steps: number of interpolation points (midpoint rule); >= 1.
        path: "inputs" (interpolate the token embeddings) or "activations" (interpolate each
            hook point on its own); see the module docstring.
        method: the name recorded in the returned `Scores`.
        batch_size: run the prompts in chunks of this many (None: all at once), the same
            scores to rounding (as in `attribution_patching`). On the activations path one
            backward pass holds `steps` copies of a chunk.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if path not in ("inputs", "activations"):
        raise ValueError(f"path must be 'inputs' or 'activations', got {path!r}")
    target, source, fams, names, metric = prepare(model, clean_tokens, corrupt_tokens, metric,
                                                  site_families, direction)
    along = _ig_activations if path == "activations" else _ig_inputs

    def run(target: Tensor, source: Tensor, metric: Metric) -> tuple[dict[str, Tensor], float]:
        return along(model, target, source, metric, fams, names, steps)

    with site_config(model, fams):  # split q/k/v input sites fire only with their flags on
        values, baseline = in_prompt_chunks(run, target, source, metric, batch_size)
    return make_scores(model, fams, values, target, baseline, method)


def _ig_inputs(
    model: HookedTransformer,
    target: Int[Tensor, "batch pos"],
    source: Int[Tensor, "batch pos"],
    metric: Metric,
    fams: list,
    names: list[str],
    steps: int,
) -> tuple[dict[str, Tensor], float]:
    """IG along the straight line between the two runs' embeddings: site values and baseline."""
    embeds = [n for n in EMBED_HOOKS if n in model.hook_dict]
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in {*names, *embeds})
        _, target_cache = model.run_with_cache(target, names_filter=lambda n: n in {*names, *embeds})
        baseline = metric.on_model(model, target).mean().item()
    embeds = [n for n in embeds if n in target_cache.cache_dict]  # ALiBi has no position embedding

    mean_grads = {n: torch.zeros_like(target_cache[n]) for n in names}
    for k in range(steps):
        alpha = (k + 0.5) / steps

        # each embedding replaced by its point on the line, a leaf of the graph
        points = {n: (target_cache[n] + alpha * (source_cache[n] - target_cache[n])).requires_grad_(True)
                  for n in embeds}
        _, grads, _ = activation_grads(model, target, metric, names,
                                       fwd_hooks=patch(model, points, embeds).fwd_hooks())
        for n in names:
            mean_grads[n] += grads[n] / steps
    deltas = {n: source_cache[n] - target_cache[n] for n in names}
    return site_values(model, fams, deltas, mean_grads), baseline


def _ig_activations(
    model: HookedTransformer,
    target: Int[Tensor, "batch pos"],
    source: Int[Tensor, "batch pos"],
    metric: Metric,
    fams: list,
    names: list[str],
    steps: int,
) -> tuple[dict[str, Tensor], float]:
    """IG along each hook point's own straight line, the `steps` points stacked in the batch."""
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
        _, target_cache = model.run_with_cache(target, names_filter=lambda n: n in names)
        baseline = metric.on_model(model, target).mean().item()
    batch = target.shape[0]
    repeated = einops.repeat(target, "b p -> (s b) p", s=steps)
    metric_rep = metric.select(einops.repeat(torch.arange(batch), "b -> (s b)", s=steps))
    alphas = (torch.arange(steps, device=target.device) + 0.5) / steps
    mean_grads = {}
    for name in names:
        start, end = target_cache[name], source_cache[name]
        a = alphas.to(start.dtype).reshape(steps, *([1] * start.ndim))
        points = einops.rearrange(start + a * (end - start), "s b ... -> (s b) ...")
        leaf = points.clone().requires_grad_(True)  # the activation replaced by a leaf of the graph

        # The metric is the mean over steps * batch rows, so summing each prompt's gradient
        # over the `steps` copies gives the gradient of its batch-mean metric averaged over alpha.
        _, grads, _ = activation_grads(model, repeated, metric_rep, [name],
                                       fwd_hooks=patch(model, {name: leaf}, name).fwd_hooks())
        mean_grads[name] = einops.reduce(grads[name], "(s b) ... -> b ...", "sum", s=steps)
    deltas = {n: source_cache[n] - target_cache[n] for n in names}
    return site_values(model, fams, deltas, mean_grads), baseline
