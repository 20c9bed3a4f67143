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
for `heads_by_pos`, the parts that reach query position t). Attention and MLP outputs and neurons
have no attention softmax of their own between the site and its output, so their AtP* score is
their AtP score; for the residual stream and the query/key/value inputs see below.

**Query, key and value inputs** (`q_input`, `k_input`, `v_input`, each per head over all
positions, and their `_by_pos` variants; see `sites.py`) are the nodes the fix was made for. A
head's query input at every position patched changes every row of its pattern with its own
softmax (`A' = softmax(q' . K)`, rows independent); its key input at every position patched
changes the whole score matrix at once (`A' = softmax(Q . K'^T)`, one softmax: not the sum of
the one-key patches); one key position s patched is the key part above, scored at s; one value
position s: `sum_t d metric / d z_t . A[t, s] (v'_s - v_s)`. The patched queries, keys and
values are the source run's (the inputs are before the layer's norm, so `q'`, `k'`, `v'` are
exact through the norm, the projection and the rotation); only the step from the pattern (or
the values) to the metric is linear. AtP on the same families linearises at the input instead,
through the norm and the softmax.

**Residual-stream sites** (`resid`, the stream entering layer L at position p) read into the
attention patterns of every later layer. AtP linearises those reads; AtP* here recomputes the
patterns of `qk_layers` layers L, L+1, ... (default: every later layer) exactly and
linearises from the pattern on, as for query and key nodes. The gradient at the site splits exactly into a part through the query and
key inputs of layer L+j that the change reaches along the residual stream itself (with
`use_split_qkv_input`: `sum_h d metric / d q_input[L+j, h, p] + d metric / d k_input[L+j, h, p]`,
since the stream carries the change to every later layer unchanged) and everything else. For
each of those layers the linear term `delta . (that gradient)` is replaced by
`sum g[L+j] . (A'' - A)`, with `A''` the pattern of layer L+j when its stream at position p is
`resid[L+j, p] + delta` (query row p and key column p change together, exactly through the
norm and the rotation; the changes that blocks L..L+j-1 add on the way are left to the linear
part). With `qk_layers=1` only layer L's own pattern is recomputed, and it is then exact: the
stream entering layer L at p *is* the source's. This is `resid_through="pattern"`.

`resid_through="head_output"` (the default) goes one step further in each layer: it computes
each head's output `z''` exactly for the query, key *and* value change at p together and
linearises from z on (replacing the linear term through the query, key and value inputs). That
keeps the pattern x value interaction that the pattern-only fix drops, the term that dominates
for heads whose pattern and values both move when a name changes (see the `heads` note below);
it is no longer the paper's QK fix but the same idea one step later.

Cost, beyond AtP's two forward and one backward passes: the backward pass runs on split inputs
(every head's own copy of the stream); per site layer L and corrected layer l, one attention
call on the shifted stream and a softmax over `pos^3` entries per head and prompt (each site
position's own pattern), so `qk_layers=None` does `n_layers (n_layers + 1) / 2` of them. Measured
in forward-pass units by `benchmarks/atp_star_agreement.py`.

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

from typing import Literal, Sequence, Union

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from interp.attribution.atp import prepare
from interp.attribution.metrics import MetricLike
from interp.attribution.patching import Direction
from interp.attribution.sites import FAMILIES, FamilySpec, Scores, SiteFamily, default_labels, qkv_input_of, site_config
from interp.hooks import capture

Activations = Union[ActivationCache, dict[str, Tensor]]  # hook name -> activation

HEAD_FAMILIES = ("heads", "heads_by_pos")  # the built-in families `_on_heads` accepts


def _on_heads(fam: SiteFamily) -> bool:
    """Head outputs `z` scored per head or per (position, head): the QK fix applies."""
    return fam.hook_family == "z" and fam.axes in (("head",), ("pos", "head"))


def _on_resid(fam: SiteFamily) -> bool:
    """The residual stream entering a layer, per position: the residual QK fix applies."""
    return fam.hook_family == "resid_pre" and fam.axes == ("pos",)


def atp_star(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    site_families: FamilySpec = ("resid", "attn", "mlp", "heads"),
    direction: Direction = "denoise",
    grad_drop: bool = False,
    method: str | None = None,
    qk_layers: int | None = None,
    resid_through: Literal["pattern", "head_output"] = "head_output",
) -> dict[str, Scores]:
    """AtP* scores per family: the QK fix for attention heads, their query/key/value inputs and
    the residual stream, AtP elsewhere, optional GradDrop.

    Args:
        model, clean_tokens, corrupt_tokens, metric, site_families, direction: as in
            `attribution_patching`.
        grad_drop: also apply GradDrop; the scores are then magnitudes (see the module notes).
        method: the name recorded in the returned `Scores` (default `atp_star`, or
            `atp_star_graddrop` with `grad_drop`).
        qk_layers: for `resid` sites, how many attention layers from the site's own on are
            recomputed exactly (module notes); 0 gives AtP's resid scores, None (default) every
            later layer.
        resid_through: what the resid fix computes exactly in each of those layers before it
            linearises: `"pattern"` (the paper's QK fix: the pattern, for the query and key
            change) or `"head_output"` (each head's output z, for the query, key *and* value
            change together, which keeps the pattern x value interaction; module notes;
            default: on IOI it is the variant that tracks exact patching of the residual
            stream, see the README).
    """
    method = method or ("atp_star_graddrop" if grad_drop else "atp_star")
    target, source, fams, names, metric = prepare(model, clean_tokens, corrupt_tokens, metric,
                                                  site_families, direction)
    n_layers = model.cfg.n_layers
    layers = range(n_layers)
    if qk_layers is not None and (isinstance(qk_layers, bool) or qk_layers < 0):
        raise ValueError(f"qk_layers must be a number of layers >= 0 (or None: all later "
                         f"layers), got {qk_layers!r}")
    depth = n_layers if qk_layers is None else min(qk_layers, n_layers)
    if resid_through not in ("pattern", "head_output"):
        raise ValueError(f"resid_through must be 'pattern' or 'head_output', got {resid_through!r}")
    resid_fix = depth > 0 and any(_on_resid(f) for f in fams)
    heads_needed = resid_fix or any(_on_heads(f) or qkv_input_of(f) for f in fams)
    attn_names = _attention_hooks(model) if heads_needed else {}
    attn_all = [attn_names[k].format(L=layer) for layer in layers for k in attn_names]
    # the resid fix needs the gradients at the split query/key inputs of every layer
    letters = "qk" if resid_through == "pattern" else "qkv"
    split = [FAMILIES[f"{x}_input"] for x in letters] if resid_fix else []
    split_names = [f.hook_name(layer) for f in split for layer in layers]
    with site_config(model, [*fams, *split]):
        return _atp_star(model, target, source, fams, names, metric, grad_drop, method,
                         (depth, resid_through) if resid_fix else None, attn_names, attn_all,
                         split_names)


def _atp_star(model, target, source, fams, names, metric, grad_drop, method, resid_fix,
              attn_names, attn_all, split_names) -> dict[str, Scores]:
    """`atp_star` inside `site_config` (the split inputs' flags on where needed)."""
    n_layers = model.cfg.n_layers
    layers = range(n_layers)
    heads_needed = bool(attn_names)
    if resid_fix:
        names = sorted({*names, *[f"blocks.{layer}.hook_resid_pre" for layer in layers]})

    with torch.no_grad():
        _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in {*names, *attn_all})

    drop = {"layer": None}

    def gate(act: Tensor, hook, layer: int) -> Tensor:
        return _DropGrad.apply(act, lambda: drop["layer"] == layer)

    gates = []
    if grad_drop:
        for layer in layers:
            for name in (f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"):
                gates.append((name, lambda act, hook, layer=layer: gate(act, hook, layer)))
    keep_names = sorted({*names, *attn_all, *split_names})
    embed = model.embed.W_E
    was = embed.requires_grad
    with torch.enable_grad():
        embed.requires_grad_(True)  # the graph must exist even if the caller froze parameters
        try:
            # the capture comes first: the gates act on the captured tensors' gradients
            with capture(model, keep_names, keep_grad=True) as store, model.hooks(fwd_hooks=gates):
                value = metric.on_model(model, target).mean()
            captured = dict(store)
            # the capture hooks are off from here: the resid fix runs attention modules again
            grad_inputs = sorted({*names, *split_names, *[attn_names[k].format(L=layer)
                                                          for layer in layers for k in ("pattern", "z")]}
                                 if heads_needed else names)
            settings = [None] if not grad_drop else list(layers)
            per_setting = []
            for setting in settings:
                drop["layer"] = setting
                grads = torch.autograd.grad(value, [captured[n] for n in grad_inputs],
                                            retain_graph=True, allow_unused=True)
                grad_of = {n: (g if g is not None else torch.zeros_like(captured[n])).detach()
                           for n, g in zip(grad_inputs, grads)}
                per_setting.append(_estimates(model, fams, captured, source_cache, grad_of, attn_names,
                                              resid_fix))
        finally:
            embed.requires_grad_(was)

    if grad_drop:
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
    resid_fix: tuple[int, str] | None = None,
) -> dict[str, Float[Tensor, "layer ..."]]:
    """Per family, `[n_layers, *site axes]` estimates from one set of gradients (`resid_fix`:
    the resid fix's `(qk_layers, resid_through)`, None for none)."""
    out = {}
    for fam in fams:
        per_layer = []
        kind = qkv_input_of(fam)
        for layer in fam.layer_list(model):
            names = {k: v.format(L=layer) for k, v in attn_names.items()}
            if _on_heads(fam):
                parts = qk_fixed_head_effects(
                    model.blocks[layer].attn,
                    {k: target[n].detach() for k, n in names.items()},
                    {k: source[names[k]] for k in ("q", "k", "v")},
                    grads[names["pattern"]], grads[names["z"]],
                )
                per_pos = parts.sum(0)  # query_pos head
                per_layer.append(per_pos if "pos" in fam.axes else per_pos.sum(0))
            elif kind is not None:
                effects = qkv_input_effects(
                    model.blocks[layer].attn,
                    {k: target[n].detach() for k, n in names.items()},
                    {k: source[names[k]] for k in ("q", "k", "v")},
                    grads[names["pattern"]], grads[names["z"]],
                    kind, by_pos="pos" in fam.axes,
                )
                per_layer.append(effects)
            else:
                name = fam.hook_name(layer)
                contrib = (source[name] - target[name].detach()) * grads[name]
                est = einops.reduce(contrib.float(), fam.reduce_pattern, "sum")
                if _on_resid(fam) and resid_fix is not None:
                    est = est + resid_qk_correction(model, layer, resid_fix[0], target, source,
                                                    grads, attn_names, resid_fix[1])
                per_layer.append(est)
        out[fam.name] = torch.stack(per_layer)
    return out


def resid_qk_correction(
    model: HookedTransformer,
    layer: int,
    depth: int,
    target: Activations,
    source: Activations,
    grads: Activations,
    attn_names: dict[str, str],
    through: str = "pattern",
) -> Float[Tensor, " pos"]:
    """What AtP* adds to AtP's estimate of each residual-stream site `(layer, p)`: for each
    layer `l` of `layer .. layer + depth - 1`, the linear term through l's query and key inputs
    (`through="pattern"`; query, key and value inputs for `"head_output"`) replaced by the
    exact change, linearised from there on (module notes), summed over the batch:

        pattern:     sum_l [ g_l . (A''_l(p) - A_l)  -  delta_p . sum_h sum_{x=q,k} dm/dx_input[l, h, p] ]
        head_output: sum_l [ dm/dz_l . (z''_l(p) - z_l)  -  delta_p . sum_h sum_{x=q,k,v} dm/dx_input[l, h, p] ]

    with `delta = resid_pre[layer]^source - resid_pre[layer]^target`, and `A''_l(p)`, `z''_l(p)`
    the pattern and head outputs of layer `l` when its stream at position p is
    `resid_pre[l, p] + delta_p` (its query, key and value there recomputed by the attention
    module itself, through the norm and rotation).

    Needs, in `target`: each layer's `resid_pre`, final q/k, v, masked scores and pattern; in
    `grads`: each layer's pattern (or z) and split input gradients (`site_config` on).
    """
    resid = f"blocks.{layer}.hook_resid_pre"
    delta = (source[resid] - target[resid].detach()).float()  # batch pos d_model
    total = torch.zeros(delta.shape[1], device=delta.device)
    letters = "qk" if through == "pattern" else "qkv"
    for later in range(layer, min(layer + depth, model.cfg.n_layers)):
        names = {k: v.format(L=later) for k, v in attn_names.items()}
        stream = target[f"blocks.{later}.hook_resid_pre"].detach()
        new = final_qkv(model, later, stream + delta.to(stream.dtype), attn_names)
        old = {k: target[names[k]].detach() for k in ("q", "k", "v", "scores", "pattern")}
        exact_term = joint_site_effects(
            model.blocks[later].attn, old, new, grads[names["pattern"]],
            grads[names["z"]] if through == "head_output" else None,
        )
        linear = sum(einops.reduce(grads[f"blocks.{later}.hook_{x}_input"].float(),
                                   "b p h d -> b p d", "sum") for x in letters)
        linear_term = einops.reduce(delta * linear, "b p d -> p", "sum")
        total = total + exact_term - linear_term
    return total


def final_qkv(
    model: HookedTransformer,
    layer: int,
    stream: Float[Tensor, "batch pos d_model"],
    attn_names: dict[str, str],
) -> dict[str, Tensor]:
    """The final (rotated where rotary) queries and keys, and the values, that layer `layer`
    computes from the residual stream `stream` entering it: its norm and attention module run
    on `stream` as the block runs them (split into per-head copies when `use_split_qkv_input`
    is on), read at the module's own hook points. Per position: position p's query, key and
    value depend on `stream[:, p]` only."""
    cfg = model.cfg
    block = model.blocks[layer]
    if cfg.original_architecture in POST_NORM_ARCHITECTURES or cfg.positional_embedding_type == "shortformer":
        raise NotImplementedError("the AtP* residual QK fix supports pre-norm blocks without "
                                  "shortformer position embeddings")
    inputs = [stream] * 3
    if cfg.use_split_qkv_input:
        kv_heads = (cfg.n_key_value_heads if cfg.n_key_value_heads is not None
                    and not cfg.ungroup_grouped_query_attention else cfg.n_heads)
        inputs = [einops.repeat(stream, "b p d -> b p h d", h=h)
                  for h in (cfg.n_heads, kv_heads, kv_heads)]
    names = {k: attn_names[k].format(L=layer) for k in ("q", "k", "v")}
    with torch.no_grad(), capture(model, list(names.values()), keep_grad=True) as kept:
        block.attn(query_input=block.ln1(inputs[0]), key_input=block.ln1(inputs[1]),
                   value_input=block.ln1(inputs[2]))
    return {k: kept[n] for k, n in names.items()}


def joint_site_effects(
    attn: torch.nn.Module,
    old: dict[str, Tensor],
    new: dict[str, Tensor],
    grad_pattern: Float[Tensor, "batch head pos key_pos"],
    grad_z: Float[Tensor, "batch pos head d_head"] | None = None,
) -> Float[Tensor, " pos"]:
    """For each position p, the linearised effect of the query, key (and value) at position p
    taking their `new` values together, summed over heads and the batch.

    `A'(p)` is the pattern with row p from `q'_p . k_s` (`q'_p . k'_p` at s = p) and column p of
    the other rows from `q_t . k'_p`, one softmax per row. Without `grad_z` the result is
    `sum g . (A'(p) - A)`; with it, `sum dm/dz . (z'(p) - z)` with `z'(p)_t = sum_s A'(p)[t, s]
    v_s` and `v'_p` in place of `v_p`. `old`: the target's `q`, `k`, `v`, masked `scores` and
    `pattern`; `new`: `q`, `k`, `v`. All positions at once: memory `pos^3` per head and prompt."""
    s, a = old["scores"].float(), old["pattern"].float()
    valid = torch.isfinite(s)
    s_q = attn.calculate_attention_scores(new["q"], old["k"]).float()  # row p with the new query
    s_k = attn.calculate_attention_scores(old["q"], new["k"]).float()  # column p with the new key
    s_qk = attn.calculate_attention_scores(new["q"], new["k"]).float()  # both, at (p, p)
    n = s.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    row = eye.view(n, n, 1)  # [site p, query t, key s]: t == p
    col = eye.view(n, 1, n)  # s == p
    expand = lambda x: x.unsqueeze(2)  # noqa: E731  batch head 1 t s
    scores = torch.where(row, torch.where(col, expand(s_qk), expand(s_q)),
                         torch.where(col, expand(s_k), expand(s)))  # batch head p t s
    pattern = torch.softmax(scores.masked_fill(~expand(valid), float("-inf")), dim=-1).nan_to_num()
    if grad_z is None:
        return einops.einsum(pattern - expand(a), grad_pattern.float(), "b h p t s, b h t s -> p")
    repeat = a.shape[1] // old["v"].shape[2]
    v = torch.repeat_interleave(old["v"].float(), repeat, dim=2)  # b s h d
    dv = torch.repeat_interleave((new["v"] - old["v"]).float(), repeat, dim=2)  # b p h d
    z_old = einops.einsum(a, v, "b h t s, b s h d -> b t h d")
    # z'(p)_t = sum_s A'(p)[t, s] v_s + A'(p)[t, p] (v'_p - v_p)
    z_new = einops.einsum(pattern, v, "b h p t s, b s h d -> b p t h d")
    diag = torch.diagonal(pattern, dim1=2, dim2=4)  # b h t p: A'(p)[t, p]
    z_new = z_new + einops.einsum(diag, dv, "b h t p, b p h d -> b p t h d")
    return einops.einsum(z_new - z_old.unsqueeze(1), grad_z.float(), "b p t h d, b t h d -> p")


def qkv_input_effects(
    attn: torch.nn.Module,
    target: dict[str, Tensor],
    source: dict[str, Tensor],
    grad_pattern: Float[Tensor, "batch head query_pos key_pos"],
    grad_z: Float[Tensor, "batch query_pos head d_head"],
    kind: str,
    by_pos: bool,
) -> Float[Tensor, "*pos head"]:
    """AtP* estimates for a head's query, key or value input (`kind` `"q"`, `"k"`, `"v"`),
    summed over the batch: `[head]` for the input at every position patched at once, `[pos,
    head]` (`by_pos`) for one position (a query position for `q`; the key or value position
    for `k` and `v`). `target`/`source` as in `qk_fixed_head_effects` (keys and values per
    query head or per key/value head, as the module computes them now)."""
    scores, pattern = target["scores"].float(), target["pattern"].float()
    g = grad_pattern.float()
    valid = torch.isfinite(scores)
    if kind == "q":  # rows are independent: all positions at once is the sum over positions
        patched = attn.calculate_attention_scores(source["q"], target["k"]).float()
        change = torch.softmax(patched.masked_fill(~valid, float("-inf")), dim=-1) - pattern
        per_pos = einops.einsum(change.nan_to_num(), g, "b h t s, b h t s -> t h")
        return per_pos if by_pos else per_pos.sum(0)
    if kind == "k" and not by_pos:  # every key at once: one softmax of the whole new matrix
        patched = attn.calculate_attention_scores(target["q"], source["k"]).float()
        change = torch.softmax(patched.masked_fill(~valid, float("-inf")), dim=-1) - pattern
        return einops.einsum(change.nan_to_num(), g, "b h t s, b h t s -> h")
    if kind == "k":  # key at position p alone: column p of every row
        patched = attn.calculate_attention_scores(target["q"], source["k"]).float()
        n = scores.shape[-1]
        col = torch.eye(n, dtype=torch.bool, device=scores.device).view(n, 1, n)
        new = torch.where(col, patched.unsqueeze(2), scores.unsqueeze(2))  # b h p t s
        new = new.masked_fill(~valid.unsqueeze(2), float("-inf"))
        change = (torch.softmax(new, dim=-1) - pattern.unsqueeze(2)).nan_to_num()
        return einops.einsum(change, g, "b h p t s, b h t s -> p h")
    # values: linear through the pattern, dm/dz_t . A[t, s] (v'_s - v_s)
    repeat = pattern.shape[1] // target["v"].shape[2]
    dv = torch.repeat_interleave((source["v"] - target["v"]).float(), repeat, dim=2)
    per_pos = einops.einsum(pattern, dv, grad_z.float(), "b h t s, b s h d, b t h d -> s h")
    return per_pos if by_pos else per_pos.sum(0)


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
