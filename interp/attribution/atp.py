"""Attribution patching (AtP): a first-order estimate of every site's patching effect at once.

For a site with activation `a`, patching the source value into the target run changes the
metric by approximately

    (a_source - a_target) . d metric / d a   (gradient taken on the target run),

so one forward pass on the source, one forward and one backward pass on the target give every
site of every family (Nanda 2023; Syed et al. 2023). The estimate is exact when the metric is
linear in the activation (tested on a linear model) and degrades where attention saturates or
non-linearities bend between the two values (Kramar et al. 2024, "AtP*"). Run it inside
`interp.attribution.lrp.lrp_rules(model, ...)` and the backward pass follows LRP rules instead
of plain gradients: that is RelP (arXiv 2508.21258).

Any metric works (`metrics.Metric`, or a plain function of the full logits, which costs a
forward pass to the full logits instead of the few the metric reads). The metric is the mean
over prompts, so the gradient of the batch mean gives each prompt's
share and the sum over the batch is the mean effect, the same quantity `exact_patching`
reports. Sites that aggregate several entries (a head over all positions, a neuron over all
positions) sum their entries' contributions.
"""

from __future__ import annotations

from typing import Sequence

import einops
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.attribution.metrics import Metric, MetricLike
from interp.attribution.patching import Direction, check_pairs, targets
from interp.attribution.sites import FamilySpec, Scores, default_labels, families


def attribution_patching(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    site_families: FamilySpec = ("resid", "attn", "mlp", "heads"),
    direction: Direction = "denoise",
    method: str = "atp",
) -> dict[str, Scores]:
    """AtP scores per family: `(a_source - a_target) . grad` summed over each site's entries.

    Args:
        model: any HookedTransformer; its parameters' `requires_grad` is left as it was.
        clean_tokens, corrupt_tokens, metric, site_families, direction: as in `exact_patching`.
        method: the name recorded in the returned `Scores` (`"relp"` when run under LRP rules).
    """
    target, source, fams, names, metric = prepare(model, clean_tokens, corrupt_tokens, metric,
                                                  site_families, direction)
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
    target_acts, grads, baseline = activation_grads(model, target, metric, names)
    deltas = {n: source_cache[n] - target_acts[n] for n in names}
    return scores_from_grads(model, fams, deltas, grads, target, baseline, method)


def prepare(
    model: HookedTransformer,
    clean_tokens: Tensor,
    corrupt_tokens: Tensor,
    metric: MetricLike,
    site_families: FamilySpec,
    direction: Direction,
) -> tuple[Tensor, Tensor, list, list[str], Metric]:
    """Checked (target, source) tokens on the model's device, the families, their hook names,
    and the metric as a `Metric` bound to the batch (a plain function wrapped)."""
    metric = check_pairs(clean_tokens, corrupt_tokens, metric, model.cfg.d_vocab)
    target, source = targets(clean_tokens, corrupt_tokens, direction)
    device = model.cfg.device
    fams = families(site_families)
    names = sorted({f.hook_name(layer) for f in fams for layer in f.layer_list(model)})
    return target.to(device), source.to(device), fams, names, metric


def activation_grads(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    names: Sequence[str],
    fwd_hooks: Sequence = (),
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """Activations at `names` (detached), d mean(metric) / d activation, and the metric value.

    One forward and one backward pass; `fwd_hooks` are applied during the forward pass (before
    the capture hooks). Unreached activations get a zero gradient. The parameters'
    `requires_grad` flags are restored afterwards.
    """
    captured: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> None:
        captured[hook.name] = act

    embed = model.embed.W_E
    was = embed.requires_grad
    with torch.enable_grad(), model.hooks(fwd_hooks=[*fwd_hooks, *[(n, keep) for n in names]]):
        embed.requires_grad_(True)  # the graph must exist even if the caller froze parameters
        try:
            value = metric.on_model(model, tokens).mean()
            grads = torch.autograd.grad(value, [captured[n] for n in names], allow_unused=True)
        finally:
            embed.requires_grad_(was)
    grad_of = {n: g if g is not None else torch.zeros_like(captured[n]) for n, g in zip(names, grads)}
    return {n: a.detach() for n, a in captured.items()}, grad_of, value.item()


def scores_from_grads(
    model: HookedTransformer,
    fams: Sequence,
    deltas: dict[str, Tensor],
    grads: dict[str, Tensor],
    target: Tensor,
    baseline: float,
    method: str,
) -> dict[str, Scores]:
    """`Scores` per family from `delta * grad` at each hook point, reduced to the site axes."""
    results = {}
    for fam in fams:
        per_layer = []
        for layer in fam.layer_list(model):
            name = fam.hook_name(layer)
            contrib = (deltas[name] * grads[name]).float()
            per_layer.append(einops.reduce(contrib, fam.reduce_pattern, "sum"))
        values = torch.stack(per_layer).cpu()
        results[fam.name] = Scores(
            family=fam.name, method=method, values=values, dims=fam.dims,
            labels=default_labels(model, fam, target, values.shape[1:]), baseline=baseline,
        )
    return results
