"""One front door to every localisation method: `attribute(model, pairs, method=...)`.

    from interp.attribution import attribute
    scores = attribute(model, pairs)                                 # AtP, the pairs' metric
    exact = attribute(model, pairs, method="exact", sites=["heads"])
    relp = attribute(model, (clean, corrupt), metric, method="relp", rules=LRPRules.relp())

`attribute` calls the method's own function with the same arguments, so its numbers are that
function's numbers; it adds three things:

- **inputs**: a `PromptPairs` (its tokens, and by default its normalised logit-difference
  metric `pairs.metric(model)`), or a `(clean_tokens, corrupt_tokens)` tuple with a metric;
- **one name per method** (`METHODS`), recorded in every returned `Scores.method` (the IG paths
  as `ig_inputs` and `ig_activations`); method options go through as keywords and unknown ones
  are refused with the list of those the method takes;
- **slots**: for a `PromptPairs` whose prompts put the slots (IO, S1, S2, end) at different
  positions (mixed templates), position families are reported by slot (`interp.attribution.
  slots`). AtP computes per-prompt scores in its one pass (`per_prompt=True`) and maps each
  prompt's positions to its slots; the other methods run each group of prompts that share
  their slot positions on its own (one call per group, so a batch of many templates costs as
  many calls) and combine the groups' slot scores weighted by their size. Both equal slot
  scores computed prompt by prompt. Single-template batches keep raw positions.

Every method returns `dict[family name, Scores]`, in the order of `sites`.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable, Union

from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.attribution.atp import attribution_patching
from interp.attribution.atp_star import atp_star
from interp.attribution.ig import integrated_gradients
from interp.attribution.metrics import Metric, MetricLike, as_metric
from interp.attribution.patching import exact_patching
from interp.attribution.relp import relp
from interp.attribution.sites import FamilySpec, Scores, families
from interp.attribution.slots import by_slot, position_groups
from interp.tasks.ioi import PromptPairs

#: The front door's method names -> (function, fixed keyword arguments).
METHODS: dict[str, tuple[Callable[..., dict[str, Scores]], dict[str, Any]]] = {
    "exact": (exact_patching, {}),
    "atp": (attribution_patching, {}),
    "atp_star": (atp_star, {}),
    "ig_inputs": (integrated_gradients, {"path": "inputs"}),
    "ig_activations": (integrated_gradients, {"path": "activations"}),
    "relp": (relp, {}),
}

#: Arguments `attribute` sets itself (the method name is `name`).
_OWN = ("model", "clean_tokens", "corrupt_tokens", "metric", "site_families", "method")

PairsOrTokens = Union[PromptPairs, tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]]


def attribute(
    model: HookedTransformer,
    pairs_or_tokens: PairsOrTokens,
    metric: MetricLike | None = None,
    sites: FamilySpec = ("resid", "attn", "mlp", "heads"),
    method: str = "atp",
    slots: bool | None = None,
    name: str | None = None,
    **method_kwargs: Any,
) -> dict[str, Scores]:
    """Scores per site family from one localisation method.

    Args:
        model: any HookedTransformer.
        pairs_or_tokens: a `PromptPairs` (e.g. `interp.tasks.generate_ioi(model, 20)`) or a
            `(clean_tokens, corrupt_tokens)` tuple of `[batch, pos]` token batches.
        metric: any `metrics.Metric` or a plain function of the logits; default for pairs
            `pairs.metric(model)` (normalised logit difference); required for a token tuple.
        sites: site family names (`sites.FAMILIES`) or `SiteFamily` objects.
        method: one of `METHODS`: `"exact"` (exact activation patching), `"atp"` (attribution
            patching), `"atp_star"` (AtP*; `grad_drop=True` for GradDrop), `"ig_inputs"` /
            `"ig_activations"` (integrated gradients along the embeddings or each hook point;
            `steps=...`), `"relp"` (AtP under LRP rules; `rules=LRPRules(...)`).
        slots: report position families by named slot (`slots.by_slot`): None (default) does
            so for pairs whose prompts put the slots at different positions and keeps raw
            positions otherwise; True always (pairs only); False never (raw positions, which
            then mean different slots in different prompts of a mixed batch).
        name: the name recorded in `Scores.method` (default: `method`; AtP* with GradDrop
            records `atp_star_graddrop`).
        **method_kwargs: the method's own options (`direction`, `batch_size`, `steps`,
            `rules`, `grad_drop`, `memory_gb`, `progress`, `checkpoint`, ...).

    Returns:
        `{family name: Scores}` in the order of `sites`.

    Raises:
        ValueError: an unknown method or option, a missing or unusable metric, inputs that are
            neither pairs nor a token tuple, `slots=True` without pairs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    fn, fixed = METHODS[method]
    _check_kwargs(method, fn, fixed, method_kwargs)
    pairs, clean, corrupt = _inputs(pairs_or_tokens)
    if metric is None:
        if pairs is None:
            raise ValueError("a (clean_tokens, corrupt_tokens) tuple needs a metric: pass metric="
                             "LogitDiff(answer_ids, wrong_ids) or another metrics.Metric (or give "
                             "PromptPairs, whose metric is the default)")
        metric = pairs.metric(model)
    bound = as_metric(metric, clean.shape[0], model.cfg.d_vocab)
    label = name if name is not None else method
    kwargs = {**fixed, **method_kwargs}
    if "method" in inspect.signature(fn).parameters and not (method == "atp_star" and name is None):
        kwargs["method"] = label

    def run(clean: Tensor, corrupt: Tensor, metric: Metric, **extra: Any) -> dict[str, Scores]:
        out = fn(model, clean, corrupt, metric, sites, **{**kwargs, **extra})
        if method == "exact":
            out = {f: dataclasses.replace(s, method=label) for f, s in out.items()}
        return out

    if slots and pairs is None:
        raise ValueError("slots=True needs PromptPairs (their slot positions); got a token tuple")
    has_pos = any("pos" in f.axes for f in families(sites))
    groups = position_groups(pairs) if pairs is not None and slots is not False and has_pos else []
    keep = bool(method_kwargs.get("per_prompt"))
    if slots is None and len(groups) <= 1:
        return run(clean, corrupt, bound)
    if len(groups) <= 1:  # slots=True on one template (or no position family)
        return by_slot(run(clean, corrupt, bound), pairs, keep_prompts=keep) if slots \
            else run(clean, corrupt, bound)
    if method == "atp":  # per-prompt scores in one pass, then into slots prompt by prompt
        out = run(clean, corrupt, bound, per_prompt=True)
        return {f: by_slot(s, pairs, keep_prompts=keep) if "pos" in s.dims
                else s if keep else _mean_over_prompts(s) for f, s in out.items()}
    if method == "atp_star" and method_kwargs.get("grad_drop"):
        raise ValueError("GradDrop scores are magnitudes of batch sums, not means of per-prompt "
                         "scores, so they cannot be combined over groups of prompts into slots; "
                         "use slots=False, or single-template pairs")
    return _grouped(run, pairs, bound, groups, method_kwargs.get("checkpoint"))


def _grouped(
    run: Callable[..., dict[str, Scores]],
    pairs: PromptPairs,
    metric: Metric,
    groups: list[Tensor],
    checkpoint: str | Path | None,
) -> dict[str, Scores]:
    """Each group of prompts that share their slot positions run on its own, its position
    scores mapped to slots, and the groups combined weighted by their share of the prompts."""
    n = len(pairs)
    combined: dict[str, Scores] = {}
    for g, rows in enumerate(groups):
        sub = pairs.select(rows)
        try:
            part = metric.select(rows)
        except ValueError as err:
            raise ValueError("reporting a mixed-template batch by slot runs each template group "
                             "on its own, which needs a metric that can be evaluated on some of "
                             f"the prompts; this one cannot ({err}); use slots=False") from err
        extra = {"checkpoint": Path(checkpoint) / f"group{g}"} if checkpoint is not None else {}
        scores = by_slot(run(sub.clean_tokens, sub.corrupt_tokens, part, **extra), sub)
        weight = len(rows) / n
        for fam, s in scores.items():
            if fam not in combined:
                combined[fam] = dataclasses.replace(s, values=s.values * weight,
                                                    baseline=s.baseline * weight)
            else:
                c = combined[fam]
                c.values = c.values + s.values * weight
                c.baseline += s.baseline * weight
    return combined


def _mean_over_prompts(scores: Scores) -> Scores:
    """Per-prompt scores averaged over their `prompt` axis (the batch scores)."""
    axis = scores.dims.index("prompt")
    return dataclasses.replace(
        scores, values=scores.values.mean(axis), dims=tuple(d for d in scores.dims if d != "prompt"),
        labels={k: v for k, v in scores.labels.items() if k != "prompt"})


def _inputs(pairs_or_tokens: Any) -> tuple[PromptPairs | None, Tensor, Tensor]:
    if isinstance(pairs_or_tokens, PromptPairs):
        return pairs_or_tokens, pairs_or_tokens.clean_tokens, pairs_or_tokens.corrupt_tokens
    if isinstance(pairs_or_tokens, (tuple, list)) and len(pairs_or_tokens) == 2 \
            and all(isinstance(t, Tensor) for t in pairs_or_tokens):
        return None, pairs_or_tokens[0], pairs_or_tokens[1]
    raise ValueError(f"pairs_or_tokens must be PromptPairs (interp.tasks.generate_ioi, load_pairs) "
                     f"or a (clean_tokens, corrupt_tokens) tuple of [batch, pos] tensors; got "
                     f"{type(pairs_or_tokens).__name__}")


def _check_kwargs(method: str, fn: Callable, fixed: dict[str, Any], kwargs: dict[str, Any]) -> None:
    accepted = [p for p in inspect.signature(fn).parameters if p not in (*_OWN, *fixed)]
    fixed_given = sorted(set(kwargs) & set(fixed))
    if fixed_given:
        raise ValueError(f"method {method!r} fixes {', '.join(fixed_given)} (choose the method "
                         f"ig_inputs or ig_activations instead)")
    reserved = sorted(set(kwargs) & set(_OWN))
    if reserved:
        raise ValueError(f"{', '.join(reserved)} are attribute()'s own arguments (pass the tokens "
                         "as pairs_or_tokens, the families as sites, the recorded name as name)")
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(accepted)}")
