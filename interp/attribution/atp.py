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

`batch_size` runs the prompts in chunks (each chunk's metric `metric.select(chunk)`, on the
whole batch's normalisation) and weights each chunk's mean by its share of the prompts, so the
scores are the unchunked ones to rounding (`in_prompt_chunks`; IG and RelP use it too).
`per_prompt=True` keeps a `prompt` axis with each prompt's own estimate instead of their mean,
what `slots.by_slot` needs to report positions by named slot when templates are mixed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.attribution.metrics import Metric, MetricLike
from interp.attribution.patching import Direction, check_pairs, targets
from interp.attribution.sites import FamilySpec, Scores, default_labels, families, site_config
from interp.hooks import capture


def attribution_patching(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    site_families: FamilySpec = ("resid", "attn", "mlp", "heads"),
    direction: Direction = "denoise",
    method: str = "atp",
    batch_size: int | None = None,
    per_prompt: bool = False,
) -> dict[str, Scores]:
    """AtP scores per family: `(a_source - a_target) . grad` summed over each site's entries.

    Args:
        model: any HookedTransformer; its parameters' `requires_grad` is left as it was.
        clean_tokens, corrupt_tokens, metric, site_families, direction: as in `exact_patching`.
        method: the name recorded in the returned `Scores` (`"relp"` when run under LRP rules).
        batch_size: run the prompts in chunks of this many (None: all at once); the scores are
            the same (to rounding), the memory of the backward pass that of one chunk. Each
            chunk's metric is `metric.select(chunk)`, on the whole batch's normalisation, so a
            metric given as a plain function of the whole batch cannot be chunked.
        per_prompt: keep a `prompt` axis after `layer` (`dims` `("layer", "prompt", ...)`):
            each prompt's own estimated effect, `(a_source - a_target) . d metric_b / d a`, so
            that the mean over the prompt axis is the default score. For metrics with one value
            per prompt (a plain function returning a batch scalar has no per-prompt effects).
    """
    target, source, fams, names, metric = prepare(model, clean_tokens, corrupt_tokens, metric,
                                                  site_families, direction)

    def run(target: Tensor, source: Tensor, metric: Metric) -> tuple[dict[str, Tensor], float]:
        with torch.no_grad():
            _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
        target_acts, grads, baseline = activation_grads(model, target, metric, names)
        deltas = {n: source_cache[n] - target_acts[n] for n in names}
        return site_values(model, fams, deltas, grads, per_prompt), baseline

    with site_config(model, fams):  # split q/k/v input sites fire only with their flags on
        values, baseline = in_prompt_chunks(run, target, source, metric, batch_size, per_prompt)
    return make_scores(model, fams, values, target, baseline, method, per_prompt)


def prompt_chunks(n_prompts: int, batch_size: int | None) -> list[slice]:
    """Consecutive chunks of at most `batch_size` prompts (one chunk when None)."""
    if batch_size is None:
        return [slice(0, n_prompts)]
    if isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of prompts (or None: all at "
                         f"once), got {batch_size!r}")
    return [slice(lo, min(lo + batch_size, n_prompts)) for lo in range(0, n_prompts, batch_size)]


def in_prompt_chunks(
    run: Callable[[Tensor, Tensor, Metric], tuple[dict[str, Tensor], float]],
    target: Int[Tensor, "batch pos"],
    source: Int[Tensor, "batch pos"],
    metric: Metric,
    batch_size: int | None,
    per_prompt: bool = False,
) -> tuple[dict[str, Tensor], float]:
    """`run(target, source, metric)` on chunks of prompts, combined into the whole batch's result.

    `run` returns, per family, `[layer, *site axes]` scores of the mean metric over its chunk
    (with `per_prompt`, `[layer, chunk, *site axes]` per-prompt parts of that mean), and the
    chunk's mean baseline. The chunk means are weighted by their share of the prompts, so the
    result is the mean over all prompts; per-prompt parts are scaled by the chunk size (each
    prompt's own effect) and concatenated. Chunks keep the batch's padded width (padding after
    a prompt's end changes nothing at or before it)."""
    n = target.shape[0]
    chunks = prompt_chunks(n, batch_size)
    total: dict[str, Tensor] = {}
    pieces: dict[str, list[Tensor]] = {}
    baseline = 0.0
    for rows in chunks:
        size = rows.stop - rows.start
        part = metric if len(chunks) == 1 else _select(metric, rows, batch_size, n)
        values, chunk_baseline = run(target[rows], source[rows], part)
        baseline += chunk_baseline * size / n
        for name, v in values.items():
            if per_prompt:
                pieces.setdefault(name, []).append(v * size)
            else:
                total[name] = total[name] + v * (size / n) if name in total else v * (size / n)
    if len(chunks) == 1 and not per_prompt:
        return values, chunk_baseline  # exactly the unchunked numbers
    if per_prompt:
        total = {name: torch.cat(p, dim=1) for name, p in pieces.items()}
    return total, baseline


def _select(metric: Metric, rows: slice, batch_size: int | None, n: int) -> Metric:
    try:
        return metric.select(rows)
    except ValueError as err:
        raise ValueError(
            f"batch_size={batch_size} runs the {n} prompts in chunks, which needs a metric that "
            f"can be evaluated on some of the prompts; this one cannot: {err}"
        ) from err


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
    the capture hooks, `interp.hooks.capture(..., keep_grad=True)`), so the gradients are taken
    at what those hooks pass on. Unreached activations get a zero gradient. The parameters'
    `requires_grad` flags are restored afterwards.
    """
    embed = model.embed.W_E
    was = embed.requires_grad
    with (torch.enable_grad(), model.hooks(fwd_hooks=list(fwd_hooks)),
          capture(model, names, keep_grad=True) as captured):
        embed.requires_grad_(True)  # the graph must exist even if the caller froze parameters
        try:
            value = metric.on_model(model, tokens).mean()
            grads = torch.autograd.grad(value, [captured[n] for n in names], allow_unused=True)
        finally:
            embed.requires_grad_(was)
    grad_of = {n: g if g is not None else torch.zeros_like(captured[n]) for n, g in zip(names, grads)}
    return {n: a.detach() for n, a in captured.items()}, grad_of, value.item()


def site_values(
    model: HookedTransformer,
    fams: Sequence,
    deltas: dict[str, Tensor],
    grads: dict[str, Tensor],
    per_prompt: bool = False,
) -> dict[str, Float[Tensor, "layer ..."]]:
    """Per family, `delta * grad` at each hook point reduced to the site axes and stacked over
    layers: `[layer, *site axes]` (summed over the batch), or `[layer, batch, *site axes]`."""
    values = {}
    for fam in fams:
        pattern = fam.reduce_pattern.replace("-> ", "-> batch ") if per_prompt else fam.reduce_pattern
        per_layer = []
        for layer in fam.layer_list(model):
            name = fam.hook_name(layer)
            contrib = (deltas[name] * grads[name]).float()
            per_layer.append(einops.reduce(contrib, pattern, "sum"))
        values[fam.name] = torch.stack(per_layer)
    return values


def make_scores(
    model: HookedTransformer,
    fams: Sequence,
    values: dict[str, Tensor],
    target: Tensor,
    baseline: float,
    method: str,
    per_prompt: bool = False,
) -> dict[str, Scores]:
    """`Scores` per family from its `[layer, (prompt,) *site axes]` values."""
    results = {}
    for fam in fams:
        v = values[fam.name].cpu()
        labels = default_labels(model, fam, target, v.shape[2 if per_prompt else 1:])
        dims = fam.dims
        if per_prompt:
            dims = ("layer", "prompt", *fam.axes)
            labels["prompt"] = [str(i) for i in range(v.shape[1])]
        results[fam.name] = Scores(family=fam.name, method=method, values=v, dims=dims,
                                   labels=labels, baseline=baseline)
    return results


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
    return make_scores(model, fams, site_values(model, fams, deltas, grads), target, baseline, method)
