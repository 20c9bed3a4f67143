"""SAE latents as sites of the circuit engine, and sparse feature circuits (Marks et al. 2024).

**Latents as sites.** Once SAEs are attached (`interp.saes.attach`, error term on), every
latent at every position is a node: `latent_families(model)` gives one `SiteFamily` per kind of
hook point carrying SAEs (site axes `pos, latent`), and with `error=True` one more per kind for
the error nodes (`<hook>.hook_sae_error`, site axis `pos`: the SAE's whole reconstruction error
at one position is one node, as in Marks et al.). These families go to `exact_patching`,
`attribution_patching`, `integrated_gradients` and `relp` like any other and come back as the
same `Scores`. Because the splice computes the output as `decode(latents) + error` and passes
the model's true gradient upstream, patching a latent changes the output by exactly its decoded
change, and AtP over latents is exact wherever the model is linear in them (tested).

**Sparse feature circuits.** A circuit `C` is a set of nodes. It is scored by running the model
with every node *outside* `C` ablated (replaced by its mean over a reference set of prompts,
per position) and every node inside it left alone:

    faithfulness(C) = (m(C) - m(empty)) / (m(M) - m(empty))

where `m(M)` is the metric of the unablated model and `m(empty)` the metric with every node
ablated: 1 when the circuit carries the whole behaviour that flows through the SAEs, 0 when it
carries none. `faithfulness_curve` keeps the `n` nodes with the largest |attribution| for each
`n` in `counts` (latents and error nodes ranked together) and traces faithfulness against `n`:
the better a method ranks nodes, the faster its curve rises. This is the comparison of RelP
with integrated gradients in the RelP paper (arXiv 2508.21258, after Marks et al.).

Caveats:
- Only the hook points that carry SAEs are ablated; the rest of the model runs unchanged, so
  with SAEs at a few layers "the circuit" is the set of latents at those layers through which
  the behaviour flows, not a full computational graph.
- Mean ablation per position assumes the prompts share a layout (one template); at a position
  where templates differ the mean mixes different words. Means are taken over the rows whose
  prompt reaches that position (`end_pos`).
- With several SAEs, the SAE at an earlier layer changes the input of a later one; the later
  SAE's error node absorbs that, so `m(M)` is exactly the model's own metric.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.attribution.metrics import MetricLike, as_metric
from interp.attribution.sites import Scores, SiteFamily
from interp.saes.attach import attached_saes, latent_hook_name

__all__ = [
    "FaithfulnessCurve",
    "ablation_means",
    "circuit_metric",
    "faithfulness_curve",
    "latent_families",
    "top_nodes",
]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def latent_families(
    model: HookedTransformer, hook_names: Sequence[str] | None = None, error: bool = True
) -> list[SiteFamily]:
    """Site families over the latents (and error nodes) of the SAEs attached to `model`.

    SAEs at the same kind of hook point (e.g. `hook_resid_pre` at layers 5 and 15) form one
    family whose layers are the blocks carrying them: `latents_resid_pre` (axes `pos, latent`)
    and, with `error`, `errors_resid_pre` (axis `pos`).

    Args:
        hook_names: the SAE hook points to include (default: every attached SAE).
        error: also return the error-node families.
    """
    attached = attached_saes(model)
    names = list(attached) if hook_names is None else list(hook_names)
    if not names:
        raise ValueError("no SAEs are attached to the model; attach some with "
                         "interp.saes.attach(model, {hook_name: sae}) first")
    missing = [n for n in names if n not in attached]
    if missing:
        raise ValueError(f"no SAE is attached at {missing}; attached: {sorted(attached)}")
    by_kind: dict[str, list[int]] = {}
    for name in names:
        match = _BLOCK.match(name)
        if match is None:
            raise ValueError(f"SAE hook {name!r} is not inside a block (blocks.L.<hook>); "
                             "only block hook points can be site families")
        by_kind.setdefault(match.group(2), []).append(int(match.group(1)))
    fams = []
    for kind, layers in sorted(by_kind.items()):
        short = kind.removeprefix("hook_").replace(".", "_")
        template = f"blocks.{{L}}.{kind}"
        fams.append(SiteFamily(f"latents_{short}", latent_hook_name(template, "acts_post"),
                               ("pos", "latent"), ("batch", "pos", "latent"), tuple(sorted(layers))))
        if error:
            fams.append(SiteFamily(f"errors_{short}", latent_hook_name(template, "error"),
                                   ("pos",), ("batch", "pos", "d_act"), tuple(sorted(layers))))
    return fams


def top_nodes(scores: Mapping[str, Scores], n: int) -> dict[str, Bool[Tensor, "layer ..."]]:
    """Masks (one per family, shaped like its scores) of the `n` nodes with the largest
    |score| over all families together (ties broken by order)."""
    flat = torch.cat([s.flat().abs() for s in scores.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if n > 0:
        keep[torch.topk(flat, min(n, len(flat))).indices] = True
    masks, start = {}, 0
    for name, s in scores.items():
        size = s.values.numel()
        masks[name] = keep[start:start + size].reshape(s.values.shape)
        start += size
    return masks


def ablation_means(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    fams: Sequence[SiteFamily],
    end_pos: Int[Tensor, " batch"] | None = None,
) -> dict[str, Float[Tensor, "pos ..."]]:
    """Per hook point, the mean activation at each position over the rows whose prompt reaches
    it (rows are right-padded up to `end_pos`; None: all rows are full length)."""
    names = [f.hook_name(layer) for f in fams for layer in f.layer_list(model)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    batch, n_pos = tokens.shape
    if end_pos is None:
        valid = torch.ones(batch, n_pos, dtype=torch.bool)
    else:
        valid = torch.arange(n_pos)[None, :] <= end_pos.cpu()[:, None]
    means = {}
    for name in names:
        act = cache[name]
        w = valid.to(act.device, act.dtype).reshape(batch, n_pos, *([1] * (act.ndim - 2)))
        means[name] = (act * w).sum(0) / w.sum(0).clamp(min=1)
    return means


def circuit_metric(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    fams: Sequence[SiteFamily],
    keep: Mapping[str, Bool[Tensor, "layer ..."]],
    means: Mapping[str, Float[Tensor, "pos ..."]],
) -> float:
    """The mean metric with every node of `fams` outside `keep` replaced by its mean.

    `keep[family]` is shaped like that family's `Scores.values` (`[layer, pos, latent]` or
    `[layer, pos]`); a family missing from `keep` is ablated entirely. `metric` is any
    `interp.attribution.metrics.Metric` or a plain function of the full logits.
    """
    metric = as_metric(metric, tokens.shape[0], model.cfg.d_vocab)
    hooks = []
    for fam in fams:
        for i, layer in enumerate(fam.layer_list(model)):
            name = fam.hook_name(layer)
            mask = keep[fam.name][i] if fam.name in keep else None

            def ablate(act, hook, mask=mask, mean=means[name]):
                n_pos = act.shape[1]
                mean = mean[:n_pos].to(act.dtype)
                if mask is None:
                    return mean.expand_as(act).clone()
                m = mask[:n_pos].to(act.device)
                m = m.reshape(*m.shape, *([1] * (act.ndim - 1 - m.ndim)))
                return torch.where(m, act, mean)

            hooks.append((name, ablate))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return metric.on_model(model, tokens).mean().item()


@dataclass
class FaithfulnessCurve:
    """Faithfulness of the top-`n` circuits of one attribution method.

    Attributes:
        method: the attribution method that ranked the nodes.
        counts: node counts `n`.
        metric: `m(C_n)` for each count.
        faithfulness: `(m(C_n) - m_empty) / (m_full - m_empty)` for each count.
        m_full, m_empty: the metric of the unablated model and with every node ablated.
        n_nodes: number of nodes ranked.
    """

    method: str
    counts: list[int]
    metric: list[float]
    faithfulness: list[float]
    m_full: float
    m_empty: float
    n_nodes: int

    def to_dict(self) -> dict:
        return asdict(self)


def faithfulness_curve(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    scores: Mapping[str, Scores],
    fams: Sequence[SiteFamily],
    counts: Sequence[int],
    means: Mapping[str, Float[Tensor, "pos ..."]],
) -> FaithfulnessCurve:
    """Faithfulness of the circuits of the top-`n` nodes by |score|, for each `n` in `counts`.

    Args:
        tokens: the prompts on which the circuit is evaluated (usually the clean ones).
        metric: their metric, any `interp.attribution.metrics.Metric` or a plain function of
            the full logits (normalised or not: faithfulness is a ratio of differences).
        scores: a method's `Scores` per family of `fams` (e.g. from `relp`).
        fams: the node families (`latent_families(model)`); all their nodes can be ablated.
        means: the ablation values (`ablation_means`).
    """
    missing = [f.name for f in fams if f.name not in scores]
    if missing:
        raise ValueError(f"scores lack the families {missing}; got {sorted(scores)}")
    metric = as_metric(metric, tokens.shape[0], model.cfg.d_vocab)
    ranked = {f.name: scores[f.name] for f in fams}
    n_nodes = sum(s.values.numel() for s in ranked.values())
    with torch.no_grad():
        m_full = metric.on_model(model, tokens).mean().item()
    m_empty = circuit_metric(model, tokens, metric, fams, {}, means)
    if abs(m_full - m_empty) < 1e-9:
        raise ValueError("ablating every node leaves the metric unchanged, so faithfulness is "
                         "undefined; the SAEs' hook points do not carry this behaviour")
    values = [circuit_metric(model, tokens, metric, fams, top_nodes(ranked, int(n)), means)
              for n in counts]
    method = next(iter(ranked.values())).method
    return FaithfulnessCurve(
        method=method, counts=[int(n) for n in counts], metric=values,
        faithfulness=[(v - m_empty) / (m_full - m_empty) for v in values],
        m_full=m_full, m_empty=m_empty, n_nodes=n_nodes,
    )
