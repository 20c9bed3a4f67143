"""AtP*: attribution patching with the QK fix and, optionally, GradDrop (Kramar et al. 2024).

Kramár, Lieberum, Shah and Nanda ("AtP*: An efficient and scalable method for localizing LLM
behaviour to components", arXiv 2403.00745) name two ways plain AtP misses important
components, and fix each:

**The QK fix (saturated attention).** A head's effect flows through its queries, keys and
values. Where the attention softmax saturates, its gradient is near zero and AtP's linear
estimate of the query and key effects collapses, even when patching moves the pattern a lot.
AtP* computes the change of the attention *pattern* exactly (a softmax of the patched scores)
and linearises only from the pattern on, with `g = d metric / d pattern`:

- query of head h at position t patched: row t gets `A'_t = softmax(q'_t . K)`, and the
  estimate is `sum_s g[t, s] (A'[t, s] - A[t, s])`;
- key at position s patched: column s of the scores changes for every query t, each row is
  recomputed with its own softmax `A''`, and the estimate is
  `sum_t sum_s' g[t, s'] (A''[t, s'] - A[t, s'])`;
- value: linear already, `d metric / d z . (A dv)`.

A head's AtP* score is the sum of these three parts (over all positions for the `heads` family;
for `heads_by_pos`, the parts that reach query position t). Every other family (residual stream,
attention and MLP outputs, neurons) has no attention softmax of its own between the site and
its output, so its AtP* score is its AtP score; the paper's fix is for attention nodes.

Note the difference from AtP on the head output `z`: AtP there multiplies the *exact* change of
z (which already contains the exact softmax) by the gradient at z, i.e. it treats the query,
key and value changes jointly; AtP* sums their separate contributions, as the paper's per-node
estimates do. `z' - z = (A' - A) v + A (v' - v) + (A' - A)(v' - v)`: the parts miss the last,
interaction term. Measured on IOI (SmolLM2, 50 ABC pairs) that term dominates for the important
heads, whose pattern and values both change when the names change: AtP*'s head scores reach
Pearson 0.45 with exact patching of z against AtP's 0.995, while each part alone matches the
exact effect of patching only that head's queries (checked head by head: -0.008 vs -0.007,
-0.072 vs -0.075, 0.032 vs 0.026). Use AtP* to score query and key nodes; to score whole heads,
AtP on z is the better estimate here.

**GradDrop (cancellation).** A component can matter through several paths whose gradients
cancel. For each layer l, GradDrop recomputes the estimates with the gradient that flows back
through layer l's attention and MLP outputs set to zero, and scores a site by
`sum_l |estimate_l| / (L - 1)`. The result is a magnitude (no sign), meant to rank components
without false negatives; compare it with `|exact patching|`. Costs `L` more backward passes.

Caveats: the QK fix needs the rotated (final) queries and keys, so it supports rotary models
(with or without QK norms) and models whose `hook_q`/`hook_k` are final (no QK norm without
rotary); it raises otherwise. Attention sinks and ALiBi are not supported by the fix.
"""

from __future__ import annotations

from typing import Sequence, Union

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer

from interp.attribution.atp import prepare
from interp.attribution.metrics import MetricLike
from interp.attribution.patching import Direction
from interp.attribution.sites import FamilySpec, Scores, default_labels

Activations = Union[ActivationCache, dict[str, Tensor]]  # hook name -> activation

HEAD_FAMILIES = ("heads", "heads_by_pos")


def atp_star(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    site_families: FamilySpec = ("resid", "attn", "mlp", "heads"),
    direction: Direction = "denoise",
    grad_drop: bool = False,
    method: str | None = None,
) -> dict[str, Scores]:
    """AtP* scores per family: the QK fix for attention heads, AtP elsewhere, optional GradDrop.

    Args:
        model, clean_tokens, corrupt_tokens, metric, site_families, direction: as in
            `attribution_patching`.
        grad_drop: also apply GradDrop; the scores are then magnitudes (see the module notes).
        method: the name recorded in the returned `Scores` (default `atp_star`, or
            `atp_star_graddrop` with `grad_drop`).
    """
    method = method or ("atp_star_graddrop" if grad_drop else "atp_star")
    target, source, fams, names, metric = prepare(model, clean_tokens, corrupt_tokens, metric,
                                                  site_families, direction)
    layers = range(model.cfg.n_layers)
    heads_needed = any(f.name in HEAD_FAMILIES for f in fams)
    attn_names = _attention_hooks(model) if heads_needed else {}
    attn_all = [attn_names[k].format(L=layer) for layer in layers for k in attn_names]

    with torch.no_grad():
        _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in {*names, *attn_all})

    captured: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> None:
        captured[hook.name] = act

    drop = {"layer": None}

    def gate(act: Tensor, hook, layer: int) -> Tensor:
        return _DropGrad.apply(act, lambda: drop["layer"] == layer)

    gates = []
    if grad_drop:
        for layer in layers:
            for name in (f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"):
                gates.append((name, lambda act, hook, layer=layer: gate(act, hook, layer)))
    keep_names = sorted({*names, *attn_all})
    embed = model.embed.W_E
    was = embed.requires_grad
    with torch.enable_grad(), model.hooks(fwd_hooks=[*[(n, keep) for n in keep_names], *gates]):
        embed.requires_grad_(True)  # the graph must exist even if the caller froze parameters
        try:
            value = metric.on_model(model, target).mean()
            grad_inputs = sorted({*names, *[attn_names[k].format(L=layer) for layer in layers
                                            for k in ("pattern", "z")]} if heads_needed else names)
            settings = [None] if not grad_drop else list(layers)
            per_setting = []
            for setting in settings:
                drop["layer"] = setting
                grads = torch.autograd.grad(value, [captured[n] for n in grad_inputs],
                                            retain_graph=True, allow_unused=True)
                grad_of = {n: (g if g is not None else torch.zeros_like(captured[n])).detach()
                           for n, g in zip(grad_inputs, grads)}
                per_setting.append(_estimates(model, fams, captured, source_cache, grad_of, attn_names))
        finally:
            embed.requires_grad_(was)

    if grad_drop:
        n_layers = model.cfg.n_layers
        values = {f: sum(est[f].abs() for est in per_setting) / max(n_layers - 1, 1)
                  for f in per_setting[0]}
    else:
        values = per_setting[0]
    return {
        fam.name: Scores(family=fam.name, method=method, values=values[fam.name].cpu(),
                         dims=fam.dims, labels=default_labels(model, fam, target, values[fam.name].shape[1:]),
                         baseline=value.item(), signed=not grad_drop)
        for fam in fams
    }


class _DropGrad(torch.autograd.Function):
    """Identity forward; the backward passes zero when `is_dropped()` says so at backward time."""

    @staticmethod
    def forward(ctx, x: Tensor, is_dropped) -> Tensor:
        ctx.is_dropped = is_dropped
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (torch.zeros_like(grad) if ctx.is_dropped() else grad), None


def _attention_hooks(model: HookedTransformer) -> dict[str, str]:
    """Hook-name templates of the final queries and keys (rotated where rotary), values, masked
    scores, pattern and z; an error for attention variants the QK fix does not cover."""
    cfg = model.cfg
    rotary = cfg.positional_embedding_type == "rotary"
    if cfg.positional_embedding_type == "alibi" or getattr(cfg, "use_attention_sinks", False):
        raise NotImplementedError("the AtP* QK fix does not support ALiBi or attention sinks")
    if getattr(cfg, "use_qk_norm", False) and not rotary:
        raise NotImplementedError(
            "the AtP* QK fix needs the final queries and keys; this model normalises them after "
            "hook_q/hook_k without a rotary hook that would expose the normalised values"
        )
    q, k = ("hook_rot_q", "hook_rot_k") if rotary else ("hook_q", "hook_k")
    return {"q": f"blocks.{{L}}.attn.{q}", "k": f"blocks.{{L}}.attn.{k}",
            "v": "blocks.{L}.attn.hook_v", "scores": "blocks.{L}.attn.hook_attn_scores",
            "pattern": "blocks.{L}.attn.hook_pattern", "z": "blocks.{L}.attn.hook_z"}


def _estimates(
    model: HookedTransformer,
    fams: Sequence,
    target: Activations,
    source: Activations,
    grads: Activations,
    attn_names: dict[str, str],
) -> dict[str, Float[Tensor, "layer ..."]]:
    """Per family, `[n_layers, *site axes]` estimates from one set of gradients."""
    out = {}
    for fam in fams:
        per_layer = []
        for layer in fam.layer_list(model):
            if fam.name in HEAD_FAMILIES:
                names = {k: v.format(L=layer) for k, v in attn_names.items()}
                parts = qk_fixed_head_effects(
                    model.blocks[layer].attn,
                    {k: target[n].detach() for k, n in names.items()},
                    {k: source[names[k]] for k in ("q", "k", "v")},
                    grads[names["pattern"]], grads[names["z"]],
                )
                per_pos = parts.sum(0)  # query_pos head
                per_layer.append(per_pos.sum(0) if fam.name == "heads" else per_pos)
            else:
                name = fam.hook_name(layer)
                contrib = (source[name] - target[name].detach()) * grads[name]
                per_layer.append(einops.reduce(contrib.float(), fam.reduce_pattern, "sum"))
        out[fam.name] = torch.stack(per_layer)
    return out


def qk_fixed_head_effects(
    attn: torch.nn.Module,
    target: dict[str, Tensor],
    source: dict[str, Tensor],
    grad_pattern: Float[Tensor, "batch head query_pos key_pos"],
    grad_z: Float[Tensor, "batch query_pos head d_head"],
) -> Float[Tensor, "3 query_pos head"]:
    """The query, key and value parts of each head's AtP* estimate, per query position.

    Args:
        attn: the layer's attention module (its score function applies the scale, soft-cap
            and grouped-query expansion exactly as the forward pass does).
        target: the target run's `q`, `k` (final: rotated where rotary), `v`, `scores`
            (masked, before the softmax) and `pattern` at this layer.
        source: the source run's `q`, `k`, `v`.
        grad_pattern, grad_z: d metric / d pattern and d metric / d z on the target run.

    Returns:
        `[3, query_pos, head]`: query, key and value parts, summed over the batch. The key part
        at query position t is the effect, on row t of the pattern, of patching each key.
    """
    scores, pattern = target["scores"].float(), target["pattern"].float()
    g = grad_pattern.float()
    valid = torch.isfinite(scores)  # TransformerLens masks with -inf
    # Query part: every row of the pattern recomputed with the patched query (rows are
    # independent, so one softmax gives each position's own patch).
    patched = attn.calculate_attention_scores(source["q"], target["k"]).float()
    patched = patched.masked_fill(~valid, float("-inf"))
    q_part = (g * (torch.softmax(patched, dim=-1) - pattern)).sum(-1)  # batch head query
    # Key part: column s of the scores replaced by q_t . k'_s, one key s at a time. Each of the
    # p candidate rows gets its own softmax (memory p^3 per head; one prompt at a time).
    patched = attn.calculate_attention_scores(target["q"], source["k"]).float()
    n_pos = scores.shape[-1]
    diagonal = torch.eye(n_pos, dtype=torch.bool, device=scores.device)
    k_part = torch.zeros_like(q_part)
    for i in range(scores.shape[0]):
        rows = einops.repeat(scores[i], "h q k -> h q s k", s=n_pos)
        new = torch.where(diagonal & valid[i].unsqueeze(-1), patched[i].unsqueeze(-1), rows)
        change = torch.softmax(new, dim=-1) - pattern[i].unsqueeze(-2)  # h q s k
        k_part[i] = torch.einsum("hqsk,hqk->hq", change.nan_to_num(), g[i])
    # Value part: linear, through this head's pattern.
    repeat = pattern.shape[1] // target["v"].shape[2]
    dv = torch.repeat_interleave((source["v"] - target["v"]).float(), repeat, dim=2)
    dz = torch.einsum("bhqk,bkhd->bqhd", pattern, dv)
    v_part = einops.reduce(dz * grad_z.float(), "b q h d -> b q h", "sum")
    parts = torch.stack([
        einops.rearrange(q_part, "b h q -> b q h"), einops.rearrange(k_part, "b h q -> b q h"), v_part,
    ])
    return parts.sum(1)  # over the batch: 3 query head
