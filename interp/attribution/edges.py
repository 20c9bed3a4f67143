"""Scores for the edges of a `Graph`: EAP, EAP-IG, RelP on edges, and exact edge patching.

**The quantity.** Patching edge `s -> r` (see `graph.py`) gives receiver `r` the input
`input_r + delta_s`, `delta_s = out_s^source - out_s^target`, everything else as in the target
run. Its effect is `metric(patched) - metric(target)`, averaged over prompts. Directions as in
`patching.py`: `"denoise"` runs the corrupt prompts with clean sender outputs, `"noise"` the
reverse.

**Gradient estimates.** To first order the effect is `delta_s . d metric / d input_r`, summed
over positions and the model dimension and averaged over prompts (Syed et al. 2023, "EAP"). The
gradient with respect to every receiver's input comes from one backward pass in which each
input has its own tensor: TransformerLens's `use_split_qkv_input` gives every head its own
copies of the residual stream for its q, k and v inputs (a head's input gradient is the sum of
the three), `use_hook_mlp_in` the MLP its own copy (`receiver_inputs`). The contraction with
the sender differences runs inside the backward pass, one receiver group at a time, so the
gradients of all receivers are never held at once. Methods:

| method | gradient taken | cost (forward + backward passes of the batch) |
|---|---|---|
| `eap` | on the target run | 2 forward, 1 backward |
| `eap_ig(path="inputs")` | averaged over `steps` points on the straight line from the target's to the source's input embeddings (Hanna et al. 2024) | 2 forward, `steps` forward + backward |
| `eap_ig(path="activations")` | for each sender, averaged over `steps` points on the line from its target to its source output, all else recomputed | 2 forward, `n_senders * steps` forward + backward |
| `relp_edges` | `eap` inside `lrp_rules(model, rules)`: LRP relevance gradients (RelP) | as `eap` |
| `exact_edge_patching` | none: the patched runs themselves | 2 forward + `(n_layers - L) / n_layers` of a forward pass per edge into layer L, none for edges into the logits (on SmolLM2 about `n_edges / 3` passes in all) |

Every gradient pass is on the split inputs, which hold `3 * n_heads` copies of the residual stream per
layer: a backward pass keeps several times the activations of a plain one (`memory_gb` bounds
how many rows run at once). The estimate is exact when the metric is linear in the receiver's
input along the patch (tested on a model made linear). Summed over all edges out of one
sender, EAP equals attribution patching of that sender's output (`atp.py`), because the
gradient with respect to a write into the residual stream is the sum of the gradients of every
input that reads it later (models without a normalised attention output; tested).

**Exact edge patching** is the ground truth. Edges into the receivers of one layer share
forward passes: rows are `edges x prompts`; each copy of the target batch starts from the
target's residual stream entering the receiver's layer, gets its one sender difference added
at its receiver's input hook, and runs the remaining blocks. Edges into the logits need no
block at all (`final + delta_s`). Only the logits the metric reads are computed. As in
`exact_patching`, positions before the first token where the clean and corrupt batches differ
are not run: both runs see the same tokens there, so (causal attention) every activation and
every sender difference there is the same and no edge changes them; patched runs start at that
position `p0` and read the target's keys and values of earlier positions from a KV cache.

Any metric works (`metrics.Metric`, or a plain function of the logits).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from interp.attribution.graph import QKV, EdgeScores, EdgeSpec, Graph
from interp.attribution.lrp import LRPRules, lrp_rules
from interp.attribution.metrics import Metric, MetricLike, final_logits
from interp.attribution.patching import Direction, check_pairs, targets
from interp.hooks import capture
from interp.layout import inference_layout

__all__ = ["attn_out_norm", "capture_senders", "eap", "eap_ig", "exact_edge_patching",
           "receiver_inputs", "relp_edges", "sender_deltas", "sender_hook_names"]

#: Config flags `receiver_inputs` sets (and restores).
_FLAGS = ("use_split_qkv_input", "use_hook_mlp_in", "ungroup_grouped_query_attention")

RESID_0 = "blocks.0.hook_resid_pre"


@contextmanager
def receiver_inputs(model: HookedTransformer) -> Iterator[HookedTransformer]:
    """Within the context every receiver's input is its own tensor at its own hook point:
    `blocks.L.hook_{q,k,v}_input` (`[batch, pos, n_heads, d_model]`, one residual-stream copy per
    head; with grouped-query attention the keys and values are computed per query head, which
    gives the same numbers), `blocks.L.hook_mlp_in`. The flags are restored on exit. The
    forward values are those of the plain model up to floating-point rounding."""
    cfg = model.cfg
    saved = {k: getattr(cfg, k) for k in _FLAGS}
    try:
        cfg.use_split_qkv_input = True
        if not cfg.attn_only:
            cfg.use_hook_mlp_in = True
        if cfg.n_key_value_heads is not None:
            cfg.ungroup_grouped_query_attention = True
        yield model
    finally:
        for k, v in saved.items():
            setattr(cfg, k, v)


# ----------------------------------------------------------------------------------------------
# Sender outputs
# ----------------------------------------------------------------------------------------------


def sender_hook_names(graph: Graph) -> list[str]:
    """The hook points sender outputs are computed from: the residual stream entering layer 0,
    each layer's `attn.hook_z` (a head's output is `z @ W_O`) and `hook_mlp_out`."""
    names = [RESID_0]
    for layer in range(graph.n_layers):
        names.append(f"blocks.{layer}.attn.hook_z")
        if graph.has_mlp:
            names.append(f"blocks.{layer}.hook_mlp_out")
    return names


def _acc_dtype(model: HookedTransformer) -> torch.dtype:
    return torch.promote_types(model.cfg.dtype, torch.float32)


def attn_out_norm(model: HookedTransformer, layer: int) -> torch.nn.Module | None:
    """The norm applied to a layer's attention output before it joins the stream, if any."""
    block = model.blocks[layer]
    if model.cfg.use_normalization_before_and_after:
        return block.ln1_post
    if model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return block.ln1
    return None


def sender_deltas(
    model: HookedTransformer,
    graph: Graph,
    source: dict[str, Tensor],
    target: dict[str, Tensor],
) -> Float[Tensor, "senders batch pos d_model"]:
    """`out_s^source - out_s^target` for every sender, in `graph.senders` order, from the
    activations at `sender_hook_names(graph)` of the two runs.

    A head's output is `z_h @ W_O[h]`. Where the attention output is normalised before it
    joins the stream, a head's difference is `norm(A_t + r_h^s - r_h^t) - norm(A_t)` with
    `A_t` the target's attention output before the norm: the change of the layer's write when
    that head alone takes its source value. Float32 (float64 for float64 models)."""
    acc = _acc_dtype(model)
    out = [(source[RESID_0] - target[RESID_0]).to(acc)]
    for layer in range(graph.n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        w_o = model.blocks[layer].attn.W_O
        z_s, z_t = source[name], target[name]
        diff = einops.einsum((z_s - z_t).to(acc), w_o.to(acc), "b p h k, h k d -> h b p d")
        norm = attn_out_norm(model, layer)
        if norm is not None:
            attn = einops.einsum(z_t, w_o, "b p h k, h k d -> b p d") + model.blocks[layer].attn.b_O
            moved = norm((attn[None] + diff.to(attn.dtype)).contiguous()).to(acc)
            diff = moved - norm(attn).to(acc)[None]
        out += list(diff)
        if graph.has_mlp:
            name = f"blocks.{layer}.hook_mlp_out"
            out.append((source[name] - target[name]).to(acc))
    return torch.stack(out)


def capture_senders(model: HookedTransformer, graph: Graph, tokens: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
    """The activations at `sender_hook_names(graph)` of a plain run of `model` on `tokens`
    (no gradient), stopping at the final residual stream."""
    with torch.no_grad(), capture(model, sender_hook_names(graph), layers=None) as store:
        model(tokens, stop_at_layer=model.cfg.n_layers)
    return dict(store)


# ----------------------------------------------------------------------------------------------
# Gradient passes
# ----------------------------------------------------------------------------------------------


def _receiver_groups(graph: Graph) -> list[tuple[str, Tensor, int]]:
    """(hook name, receiver indices along the hook's head axis, senders reaching them): one
    entry per q/k/v input hook of each layer, per MLP input, and the final residual stream."""
    index = {r.name: i for i, r in enumerate(graph.receivers)}
    groups = []
    for layer in range(graph.n_layers):
        for x in QKV:
            names = [f"a{layer}.h{h}" + (f"<{x}>" if graph.qkv_inputs else "") for h in range(graph.n_heads)]
            ids = torch.tensor([index[n] for n in names])
            groups.append((f"blocks.{layer}.hook_{x}_input", ids, int(graph.n_senders_into[ids[0]])))
        if graph.has_mlp:
            i = index[f"m{layer}"]
            groups.append((f"blocks.{layer}.hook_mlp_in", torch.tensor([i]), int(graph.n_senders_into[i])))
    i = index["logits"]
    groups.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", torch.tensor([i]), graph.n_senders))
    return groups


#: `contract(grad [rows, pos, group, d_model], receiver ids, senders reaching them)` adds the
#: group's share into the `[senders, receivers]` score matrix.
Contract = Callable[[Tensor, Tensor, int], None]


def _gradient_pass(
    model: HookedTransformer,
    graph: Graph,
    tokens: Int[Tensor, "rows pos"],
    metric: Metric,
    norm: int,
    contract: Contract,
    fwd_hooks: Sequence = (),
) -> Float[Tensor, " rows"]:
    """One forward and backward pass of `sum(metric) / norm` on the split receiver inputs (the
    caller holds `receiver_inputs`), handing each receiver input's gradient to `contract` as
    it arrives. `fwd_hooks` run first (interpolations, captures). Returns the metric per row.
    Parameters' `.grad` are left untouched."""
    start: list[Tensor] = []

    def leaf(act: Tensor, hook: HookPoint) -> Tensor:
        if not act.requires_grad:  # frozen parameters: start the graph here
            act = act.detach().requires_grad_(True)
        start.append(act)
        return act

    def on_grad(grad: Tensor, ids: Tensor, n_before: int) -> None:
        contract(grad if grad.ndim == 4 else grad.unsqueeze(2), ids, n_before)

    def watch(act: Tensor, hook: HookPoint, ids: Tensor, n_before: int) -> None:
        if act.requires_grad:
            act.register_hook(lambda g: on_grad(g, ids, n_before))

    hooks = [*fwd_hooks, (RESID_0, leaf)]
    hooks += [(name, partial(watch, ids=ids, n_before=n)) for name, ids, n in _receiver_groups(graph)]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        values = metric.on_model(model, tokens)
        torch.autograd.grad(values.sum() / norm, start)
    return values.detach()


def _shared_contract(scores: Tensor, deltas: Tensor, batch: int) -> Contract:
    """Every row copy uses the same sender differences (`deltas [senders, batch, pos, d]`):
    gradients are summed over copies, then `scores[:n, ids] += deltas[:n] . grad`."""
    flat = deltas.flatten(1)

    def contract(grad: Tensor, ids: Tensor, n_before: int) -> None:
        g = einops.reduce(grad, "(c b) p r d -> (b p d) r", "sum", b=batch).to(flat.dtype)
        scores[:n_before, ids.to(scores.device)] += flat[:n_before] @ g

    return contract


def _prepare(
    model: HookedTransformer,
    clean_tokens: Tensor,
    corrupt_tokens: Tensor,
    metric: MetricLike,
    graph: Graph | None,
    direction: Direction,
) -> tuple[Tensor, Tensor, Metric, Graph]:
    metric = check_pairs(clean_tokens, corrupt_tokens, metric, model.cfg.d_vocab)
    target, source = targets(clean_tokens, corrupt_tokens, direction)
    if graph is None:
        graph = Graph.from_model(model)
    elif not isinstance(graph, Graph):
        raise ValueError(f"graph must be a Graph (Graph.from_model(model)), got {type(graph).__name__}")
    graph.check_model(model)
    device = model.cfg.device
    return target.to(device), source.to(device), metric, graph


def _edge_scores(graph: Graph, scores: Tensor, method: str, baseline: float) -> EdgeScores:
    values = scores.float().cpu()[graph.mask]
    return EdgeScores(graph=graph, ids=torch.arange(graph.n_edges), values=values, method=method,
                      baseline=baseline)


def _rows_per_pass(model: HookedTransformer, n_pos: int, memory_gb: float, backward: bool) -> int:
    """A rough count of the rows whose activations fit `memory_gb`: per layer the split q/k/v
    inputs and their normalised copies, the residual stream, MLP hidden and attention
    patterns; all layers are kept for a backward pass, one block otherwise."""
    cfg = model.cfg
    per_layer = n_pos * (6 * cfg.n_heads * cfg.d_model + 8 * cfg.d_model + 4 * (cfg.d_mlp or 0)
                         + 4 * cfg.n_heads * cfg.d_head) + 3 * cfg.n_heads * n_pos * n_pos
    per_row = per_layer * (2 * cfg.n_layers if backward else 2) * (torch.finfo(cfg.dtype).bits // 8)
    return max(1, int(memory_gb * 2**30 // per_row))


# ----------------------------------------------------------------------------------------------
# EAP, RelP
# ----------------------------------------------------------------------------------------------


def eap(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    graph: Graph | None = None,
    direction: Direction = "denoise",
    method: str = "eap",
    rules: LRPRules | None = None,
) -> EdgeScores:
    """Edge attribution patching: `delta_s . d metric / d input_r` per edge, the gradient on
    the target run, summed over positions and averaged over prompts.

    Args:
        model: a causal HookedTransformer (its config flags and parameters are left as they were).
        clean_tokens, corrupt_tokens: `[batch, pos]`, the same shape.
        metric: any `metrics.Metric`, or a plain function of the full logits.
        graph: the edges to score (default `Graph.from_model(model)`; pass
            `Graph.from_model(model, qkv_inputs=True)` for q/k/v inputs apart).
        direction: `"denoise"` (clean sender outputs into the corrupt run) or `"noise"`.
        method: the name recorded in the result (`"relp"` under LRP rules).
        rules: run the gradient pass inside `lrp_rules(model, rules)` (`relp_edges`).
    """
    target, source, metric, graph = _prepare(model, clean_tokens, corrupt_tokens, metric, graph, direction)
    batch = target.shape[0]
    names = sender_hook_names(graph)
    scores = torch.zeros(graph.n_senders, graph.n_receivers, dtype=_acc_dtype(model), device=target.device)
    state: dict[str, Contract] = {}

    def contract(grad: Tensor, ids: Tensor, n_before: int) -> None:
        if "c" not in state:  # the forward pass is over: the target's sender outputs are all here
            state["c"] = _shared_contract(scores, sender_deltas(model, graph, source_acts, dict(kept)),
                                          batch)
        state["c"](grad, ids, n_before)

    with receiver_inputs(model), (lrp_rules(model, rules) if rules is not None else nullcontext()):
        source_acts = capture_senders(model, graph, source)
        # entered before the gradient pass's own hooks, so it records what they start from
        with capture(model, names, layers=None) as kept:
            values = _gradient_pass(model, graph, target, metric, batch, contract)
    return _edge_scores(graph, scores, method, values.float().mean().item())


def relp_edges(*args: Any, rules: LRPRules | None = None, method: str = "relp", **kwargs: Any) -> EdgeScores:
    """RelP on edges: `eap` (same arguments) run inside `lrp_rules(model, rules)` (default
    `LRPRules.relp()`), so the receiver gradients are LRP relevance gradients; the sender
    differences and the metric are the same as EAP's (the forward pass is bit-identical)."""
    return eap(*args, rules=LRPRules.relp() if rules is None else rules, method=method, **kwargs)


# ----------------------------------------------------------------------------------------------
# EAP-IG
# ----------------------------------------------------------------------------------------------


def eap_ig(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    graph: Graph | None = None,
    direction: Direction = "denoise",
    steps: int = 5,
    path: Literal["inputs", "activations"] = "inputs",
    memory_gb: float = 2.0,
    progress: bool = False,
    method: str = "eap-ig",
) -> EdgeScores:
    """EAP with integrated gradients: `delta_s . mean_alpha d metric / d input_r` per edge.

    `path="inputs"` (EAP-IG, Hanna et al. 2024): the residual stream entering layer 0 (the
    embeddings) moves along `x_t + alpha (x_s - x_t)`, and the gradient at every receiver is
    averaged over the midpoints `alpha = (k + 1/2) / steps`. `path="activations"`: for each
    sender in turn, only that sender's output moves from its target to its source value (a
    head through its `z`), everything downstream recomputed, and the edges out of that sender
    use the gradient averaged along its own path. The `steps` points (and, for activations,
    several senders) run as one batch of rows. Arguments as in `eap`.

    Args:
        steps: interpolation points (midpoint rule), >= 1.
        path: `"inputs"` or `"activations"`.
        memory_gb: rough bound on the activations of one pass (rows are chunked by it).
        progress: show a progress bar (activations path).
    """
    if isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if path not in ("inputs", "activations"):
        raise ValueError(f"path must be 'inputs' or 'activations', got {path!r}")
    target, source, metric, graph = _prepare(model, clean_tokens, corrupt_tokens, metric, graph, direction)
    batch, n_pos = target.shape
    scores = torch.zeros(graph.n_senders, graph.n_receivers, dtype=_acc_dtype(model), device=target.device)
    max_rows = _rows_per_pass(model, n_pos, memory_gb, backward=True)
    with receiver_inputs(model):
        src, tgt = capture_senders(model, graph, source), capture_senders(model, graph, target)
        with torch.no_grad():
            baseline = metric.on_model(model, target).float().mean().item()
        deltas = sender_deltas(model, graph, src, tgt)
        alphas = (torch.arange(steps, device=target.device, dtype=_acc_dtype(model)) + 0.5) / steps
        if path == "inputs":
            _ig_inputs(model, graph, target, metric, scores, deltas, src, tgt, alphas, max_rows)
        else:
            _ig_activations(model, graph, target, metric, scores, deltas, src, tgt, alphas, max_rows,
                            progress)
    return _edge_scores(graph, scores, method, baseline)


def _ig_inputs(model, graph, target, metric, scores, deltas, src, tgt, alphas, max_rows) -> None:
    batch, steps = target.shape[0], len(alphas)
    contract = _shared_contract(scores, deltas, batch)
    x_t, x_s = tgt[RESID_0], src[RESID_0]
    per_pass = max(1, max_rows // batch)
    for lo in range(0, steps, per_pass):
        a = alphas[lo:lo + per_pass]
        n = len(a)

        def interpolate(act: Tensor, hook: HookPoint, a: Tensor = a) -> Tensor:
            points = x_t[None] + a[:, None, None, None].to(x_t.dtype) * (x_s - x_t)[None]
            return einops.rearrange(points, "s b p d -> (s b) p d").requires_grad_(True)

        rows = einops.repeat(target, "b p -> (s b) p", s=n)
        _gradient_pass(model, graph, rows, metric.select(torch.arange(batch).repeat(n)),
                       batch * steps, contract, fwd_hooks=[(RESID_0, interpolate)])


def _ig_activations(model, graph, target, metric, scores, deltas, src, tgt, alphas, max_rows,
                    progress) -> None:
    """Each sender's own path; `copies` senders x `steps` points x batch rows per pass."""
    batch, steps = target.shape[0], len(alphas)
    flat = deltas.flatten(1)
    copies = max(1, max_rows // (batch * steps))
    bar = tqdm(total=graph.n_senders, desc="eap-ig (activations)", disable=not progress, unit="sender")
    for lo in range(0, graph.n_senders, copies):
        senders = torch.arange(lo, min(lo + copies, graph.n_senders), device=target.device)
        c = len(senders)

        def contract(grad: Tensor, ids: Tensor, n_before: int, senders: Tensor = senders) -> None:
            g = einops.reduce(grad, "(c s b) p r d -> c (b p d) r", "sum", c=len(senders), s=steps)
            out = torch.einsum("cn,cnr->cr", flat[senders], g.to(flat.dtype))
            scores[senders[:, None], ids[None, :].to(senders.device)] += out

        hooks = _interpolation_hooks(graph, senders.tolist(), src, tgt, alphas, batch)
        rows = einops.repeat(target, "b p -> (c s b) p", c=c, s=steps)
        _gradient_pass(model, graph, rows, metric.select(torch.arange(batch).repeat(c * steps)),
                       batch * steps, contract, fwd_hooks=hooks)
        bar.update(c)
    bar.close()


def _interpolation_hooks(graph: Graph, senders: list[int], src: dict[str, Tensor],
                         tgt: dict[str, Tensor], alphas: Tensor, batch: int) -> list:
    """Hooks that move copy `i`'s sender (`senders[i]`) along its line, for every step."""
    c, steps = len(senders), len(alphas)
    by_hook: dict[str, list[tuple[int, int | None]]] = {}
    for i, s in enumerate(senders):
        node = graph.senders[s]
        if node.kind == "input":
            by_hook.setdefault(RESID_0, []).append((i, None))
        elif node.kind == "head":
            by_hook.setdefault(f"blocks.{node.layer}.attn.hook_z", []).append((i, node.head))
        else:
            by_hook.setdefault(f"blocks.{node.layer}.hook_mlp_out", []).append((i, None))

    def move(act: Tensor, hook: HookPoint, items: list[tuple[int, int | None]]) -> Tensor:
        start, end = tgt[hook.name], src[hook.name]
        a = alphas.to(act.dtype)
        out = act.clone()
        view = out.view(c, steps, batch, *act.shape[1:])
        for i, head in items:
            if head is None:
                view[i] = start[None] + a.view(-1, *[1] * start.ndim) * (end - start)[None]
            else:
                z0, z1 = start[:, :, head], end[:, :, head]
                view[i, :, :, :, head] = z0[None] + a.view(-1, 1, 1, 1) * (z1 - z0)[None]
        return out

    return [(name, partial(move, items=items)) for name, items in by_hook.items()]


# ----------------------------------------------------------------------------------------------
# Exact edge patching
# ----------------------------------------------------------------------------------------------


def exact_edge_patching(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    graph: Graph | None = None,
    direction: Direction = "denoise",
    edges: Sequence[EdgeSpec] | None = None,
    receivers: str | Sequence[str] | None = None,
    sample: int | None = None,
    seed: int = 0,
    memory_gb: float = 1.0,
    progress: bool = True,
) -> EdgeScores:
    """Patch edges one at a time, many per forward pass: the ground truth for `eap` and co.

    Patching `s -> r`: receiver `r`'s input becomes `input_r + out_s^source - out_s^target`,
    everything else as in the target run (every other path from `s` included); the score is
    the mean over prompts of `metric(patched) - metric(target)`.

    Args:
        model, clean_tokens, corrupt_tokens, metric, graph, direction: as in `eap`.
        edges: the edges to patch (names `"a0.h1->m2"`, (sender, receiver) pairs, `Edge`s or
            edge numbers); default every edge.
        receivers: instead, every edge into these receivers (names or patterns, `"m*"`, `"a3.*"`,
            `"logits"`; a head's name covers its q, k and v inputs).
        sample: patch a random sample of this many of the chosen edges (seeded by `seed`).
        memory_gb: rough bound on the activations of one block call.
        progress: show a progress bar.

    Returns:
        `EdgeScores` of the patched edges (in edge order), method `exact`.
    """
    target, source, metric, graph = _prepare(model, clean_tokens, corrupt_tokens, metric, graph, direction)
    ids = _chosen(graph, edges, receivers, sample, seed)
    batch, n_pos = target.shape
    names = sender_hook_names(graph)
    pairs = graph.pairs(ids)
    layer_of = torch.tensor([graph.receivers[r].node.layer for r in pairs[:, 1].tolist()], dtype=torch.long)
    differs = (target != source).any(0).nonzero()
    p0 = int(differs[0]) if len(differs) else n_pos - 1  # at most n_pos - 1: something runs
    copies = max(1, _rows_per_pass(model, n_pos - p0, memory_gb, backward=False) // batch)
    values = torch.zeros(len(ids))
    bar = tqdm(total=len(ids), desc="exact edge patching", disable=not progress, unit="edge")
    with torch.no_grad(), inference_layout(model):
        run = _target_run(model, target, names, metric, p0)
        deltas = sender_deltas(model, graph, capture_senders(model, graph, source), run.acts)
        deltas = deltas[:, :, p0:].to(model.cfg.dtype)
        for layer in sorted(set(layer_of.tolist())):
            todo = (layer_of == layer).nonzero()[:, 0]
            for lo in range(0, len(todo), copies):
                chunk = todo[lo:lo + copies]
                patched = _run_edges(model, graph, run, deltas, pairs[chunk], layer)
                values[chunk] = (patched - run.baseline).float().mean(1).cpu()
                bar.update(len(chunk))
    bar.close()
    return EdgeScores(graph=graph, ids=ids, values=values, method="exact",
                      baseline=run.baseline.float().mean().item())


def _chosen(graph: Graph, edges: Sequence[EdgeSpec] | None, receivers: str | Sequence[str] | None,
            sample: int | None, seed: int) -> Int[Tensor, " k"]:
    if edges is not None and receivers is not None:
        raise ValueError("give either `edges` or `receivers`, not both")
    if edges is not None:
        ids = graph.select(edges=[edges] if isinstance(edges, (str, int)) else edges)
    elif receivers is not None:
        ids = graph.select(receiver=receivers)
    else:
        ids = torch.arange(graph.n_edges)
    if sample is not None:
        if isinstance(sample, bool) or not 1 <= sample <= len(ids):
            raise ValueError(f"sample must be an integer in [1, {len(ids)}] (the chosen edges), got {sample}")
        pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:sample]
        ids = ids[pick.sort().values]
    if len(ids) == 0:
        raise ValueError("no edges chosen")
    return ids


class _TargetRun(NamedTuple):
    """The unpatched target run that every patched run starts from (positions `p0..`)."""

    starts: list[Float[Tensor, "batch pos d_model"]]
    """The residual stream entering each layer at positions `p0..`, and the final one last."""
    kv: list[TransformerLensKeyValueCacheEntry]
    """Each layer's keys and values at positions before `p0` (frozen; key/value heads as the
    model groups them)."""
    acts: dict[str, Tensor]
    """The activations at `sender_hook_names`, every position."""
    p0: int
    metric: Metric
    baseline: Float[Tensor, " batch"]
    """The metric of each prompt's unpatched target run."""
    prefix_logits: Float[Tensor, "batch p0 vocab"] | None
    """The logits before `p0`, kept only for metrics that read every position."""


def _target_run(model: HookedTransformer, tokens: Tensor, names: Sequence[str], metric: Metric,
                p0: int) -> _TargetRun:
    """Run the target block by block, keeping the sender activations, the residual stream
    entering each layer and each layer's keys and values."""
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0]).entries
    with capture(model, names, layers=None, keep_grad=True) as store:
        x = model(tokens, stop_at_layer=0)
        starts = [x[:, p0:]]
        for block, entry in zip(model.blocks, kv):
            x = block(x, past_kv_cache_entry=entry)
            starts.append(x[:, p0:])
    kept = dict(store)
    for entry in kv:
        entry.past_keys, entry.past_values = entry.past_keys[:, :p0], entry.past_values[:, :p0]
        entry.frozen = True
    if metric.reads_all_positions:
        logits = final_logits(model, x)
        return _TargetRun(starts, kv, kept, p0, metric, metric(logits), logits[:, :p0])
    baseline = metric.from_final_resid(model, metric.at_end(x))
    return _TargetRun(starts, kv, kept, p0, metric, baseline, None)


def _past(run: _TargetRun, layer: int, copies: int, per_query_head: bool,
          n_heads: int) -> TransformerLensKeyValueCacheEntry | None:
    """Layer `layer`'s cached keys and values before `p0` for `copies` copies of the batch;
    repeated per query head for a block run with `ungroup_grouped_query_attention`."""
    if run.p0 == 0:
        return None
    entry = run.kv[layer]
    keys, vals = entry.past_keys, entry.past_values
    if per_query_head and keys.shape[2] != n_heads:
        keys = keys.repeat_interleave(n_heads // keys.shape[2], dim=2)
        vals = vals.repeat_interleave(n_heads // vals.shape[2], dim=2)
    return TransformerLensKeyValueCacheEntry(past_keys=keys.repeat(copies, 1, 1, 1),
                                             past_values=vals.repeat(copies, 1, 1, 1), frozen=True)


def _metric_rows(model: HookedTransformer, run: _TargetRun,
                 final: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, "copies batch"]:
    """The metric of each row (rows `(copies batch)`) from the final residual stream at
    positions `p0..`. A prompt whose prediction lies before `p0` keeps its baseline (no edge
    can change it); a metric that reads every position gets the target's logits before `p0`."""
    metric, p0 = run.metric, run.p0
    batch = len(metric)
    copies = final.shape[0] // batch
    if metric.reads_all_positions:
        logits = final_logits(model, final)
        if p0:
            logits = torch.cat([run.prefix_logits.repeat(copies, 1, 1), logits], 1)
        return metric(logits).view(copies, batch)
    end = metric.positions(p0 + final.shape[1]).to(final.device)
    rel = (end - p0).clamp(min=0).repeat(copies)
    values = metric.from_final_resid(model, final[torch.arange(final.shape[0], device=final.device), rel])
    values = values.view(copies, batch)
    if bool((end < p0).any()):
        values = torch.where((end >= p0)[None], values, run.baseline[None])
    return values


def _run_edges(
    model: HookedTransformer,
    graph: Graph,
    run: _TargetRun,
    deltas: Float[Tensor, "senders batch pos d_model"],
    pairs: Int[Tensor, "c 2"],
    layer: int,
) -> Float[Tensor, "c batch"]:
    """The metric of `c` patched copies of the target batch, copy `i` with edge `pairs[i]`,
    every receiver in `layer` (`n_layers`: the logits). Positions `p0..` only."""
    starts = run.starts
    c, batch = len(pairs), starts[0].shape[0]
    senders = pairs[:, 0]
    if layer == graph.n_layers:  # the logits read the final residual stream directly
        final = einops.repeat(starts[-1], "b p d -> (c b) p d", c=c) + einops.rearrange(
            deltas[senders], "c b p d -> (c b) p d")
        return _metric_rows(model, run, final)

    heads = {x: [] for x in QKV}
    mlp = []
    for i, (s, r) in enumerate(pairs.tolist()):
        receiver = graph.receivers[r]
        if receiver.node.kind == "mlp":
            mlp.append((i, s))
        else:
            for x in (QKV if receiver.qkv is None else (receiver.qkv,)):
                heads[x].append((i, receiver.node.head, s))

    def add_heads(act: Tensor, hook: HookPoint, items: list) -> Tensor:
        ci, hi, si = (torch.tensor(v, device=act.device) for v in zip(*items))
        out = act.clone()
        out.view(c, batch, *act.shape[1:])[ci, :, :, hi] += deltas[si]
        return out

    def add_mlp(act: Tensor, hook: HookPoint) -> Tensor:
        ci, si = (torch.tensor(v, device=act.device) for v in zip(*mlp))
        out = act.clone()
        out.view(c, batch, *act.shape[1:])[ci] += deltas[si]
        return out

    hooks = [(f"blocks.{layer}.hook_{x}_input", partial(add_heads, items=items))
             for x, items in heads.items() if items]
    if mlp:
        hooks.append((f"blocks.{layer}.hook_mlp_in", add_mlp))
    x = einops.repeat(starts[layer], "b p d -> (c b) p d", c=c)
    n_heads = model.cfg.n_heads
    with receiver_inputs(model), model.hooks(fwd_hooks=hooks):
        x = model.blocks[layer](x, past_kv_cache_entry=_past(run, layer, c, True, n_heads))
    for later in range(layer + 1, graph.n_layers):
        x = model.blocks[later](x, past_kv_cache_entry=_past(run, later, c, False, n_heads))
    return _metric_rows(model, run, x)
