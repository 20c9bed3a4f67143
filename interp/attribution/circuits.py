"""Circuits: which edges (or nodes) carry a behaviour, and how faithfully a circuit reproduces it.

**Edge circuits.** A circuit `C` is a set of edges of a `Graph` (a `[senders, receivers]`
boolean mask, as `EdgeScores.mask` gives). It is evaluated on the clean prompts with every edge
*outside* `C` ablated: receiver `r` reads

    input_r = resid_r - sum over senders s with (s -> r) not in C of (out_s - out_s^abl)

where `resid_r` and `out_s` are the values in this same (intervened) run and `out_s^abl` is the
sender's output on the corrupt prompt (`ablation="corrupt"`, the interchange intervention of
MIB and EAP-IG) or its mean over a reference batch, per position (`ablation="mean"`). Edges in
`C` keep whatever the sender writes in this run. A node whose inputs were all ablated still
runs, on ablated inputs: a node with no kept path from the input is ablated through its edges
implicitly, and a node with no kept path to the logits cannot matter. Consequences, all tested:

- the full circuit (every edge) is the clean run;
- the empty circuit is the ablated run: every node reads only ablated outputs, and the logits
  read their sum, which (the biases `b_O` being the same in every run) is the ablated final
  residual stream; ablating just the edges into the logits already gives it. With
  `ablation="corrupt"` it is the corrupt run's metric;
- a circuit missing one edge is `exact_edge_patching` of that edge with `direction="noise"`.

Several circuits run as one batch (`edge_circuit_metrics`): rows are `(circuits prompts)`. As
the run goes, each sender's difference `out_s^abl - out_s` is kept (`[senders, rows, pos,
d_model]`, float32 or the model's float64; `memory_gb` bounds it), and at each receiver input hook (the split q/k/v
inputs of `receiver_inputs`, `hook_mlp_in`, the last `hook_resid_post`) the differences of the
senders that circuit excludes are added. A head's output is `z @ W_O`, as in `graph.py`.
Models that normalise the attention output (Gemma's `ln1_post`, OLMo 2's post-norm) do not write
a sum over heads: there receiver `r` sees the layer write `norm(A + sum over the heads it
excludes of (r_h^abl - r_h))` instead of `norm(A)`, with `A` the layer's attention output
before the norm in this run and `r_h = z_h @ W_O[h]`. For one head that is the difference
`sender_deltas` uses; for every head of a layer it is the ablated layer's write. (With mean
ablation `r_h^abl` is the mean of `r_h`, so the ablated write is the norm of the mean, not the
mean of the norm.)

**Discovery.** `top_edges(scores, n)`: the `n` edges with the largest |score| (or the most
positive: `by="max"`). `prune_edges(graph, keep)`: only the edges on some path from the input
to the logits inside the kept set, i.e. whose sender is reachable from `input` and whose
receiver's node reaches `logits`, both through kept edges (a head is reached when any of its
q, k, v inputs is). With `ablation="corrupt"` pruning leaves the metric as it is: a node with
no kept path from the input reads only corrupt values, so it writes exactly its corrupt output
and its kept edges carry what an ablated edge would; an edge into a node with no path to the
logits cannot matter. Pruning then only makes the edge count honest (MIB prunes before it
counts and evaluates; so does `faithfulness_curve` by default). With mean ablation a node cut
off from the input writes `f(mean input)` rather than the mean of `f`, so there pruning does
change the metric a little. `greedy_edges(scores, n)`: MIB's greedy selection, built from
the logits backwards (repeatedly the best-scored edge into a node already in the circuit).

**Faithfulness** of a circuit is normalised between the empty circuit and the full model:

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

with `m(full)` the metric of the clean run (nothing patched) and `m(empty)` the metric with
every edge ablated. `faithfulness_curve` evaluates the top-`n` circuits for a list of sizes and
summarises the curve as MIB's circuit-track metrics (Mueller et al. 2025, "MIB: A Mechanistic
Interpretability Benchmark", arXiv 2504.13151):

- **CPR** (circuit performance ratio, higher is better): the area under `f` against the
  fraction of edges kept, `x = n / n_edges` in [0, 1], by the trapezoid rule over the evaluated
  points;
- **CMD** (circuit-model distance, lower is better): the area between the curve and 1, the
  trapezoid rule applied to `|1 - f|` at the same points.

What exactly is implemented, checked against the MIB circuit-track evaluation code
(`evaluate_area_under_curve` in MIB_circuit_track/evaluation.py of the MIB circuit-track
repository, as forked in cisnlp/MIB-circuit-track): its default points are the fractions
`MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)`, the circuit at
fraction `x` is the top `int(x * n_edges)` edges, then pruned, and `x` stays the nominal
fraction even where pruning keeps fewer edges (we record the kept counts beside it); the areas
are trapezoids over these points on a linear axis, so they cover [0.001, 1], not [0, 1] (a
constant `f = 1` gives CPR 0.999). `faithfulness_curve(fractions=...)` reproduces that;
`ns=[...]` takes edge counts instead, with `x = n / n_edges`. MIB reports CPR for circuits
ranked by signed score (`by="max"`) and CMD for circuits ranked by |score| (`by="abs"`); pass
`by` accordingly. "Signed" means positive = the edge helps the behaviour: that is `by="max"` on
scores of `direction="denoise"` (the default: patching the clean value in raises the metric)
and `by="min"` on scores of `direction="noise"` (patching the corrupt value in lowers it). Deviations: m(empty) here is computed with the same ablation as the circuits
(MIB does the same); mean ablation here is per position over a reference batch of this run's
prompts (MIB's optional mean ablations use a separate data set).

**Node circuits** (`node_circuit_metric`, `node_faithfulness_curve`, `top_nodes`,
`ablation_means`) take the nodes of site families instead (SAE latents and error nodes in
`interp.saes.circuits`, which re-exports them under their former names): every node outside the
circuit is mean-ablated at its own hook point, per position, and the faithfulness curve runs
over node counts (Marks et al. 2024, "Sparse feature circuits").
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, replace
from typing import Literal, Mapping, Sequence

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from interp.attribution.edges import RESID_0, attn_out_norm, capture_senders, receiver_inputs
from interp.attribution.graph import EdgeScores, Graph
from interp.attribution.metrics import Metric, MetricLike, as_metric
from interp.attribution.patching import check_pairs
from interp.attribution.sites import Scores, SiteFamily
from interp.hooks import hook_family

__all__ = [
    "MIB_FRACTIONS",
    "EdgeFaithfulnessCurve",
    "NodeFaithfulnessCurve",
    "ablation_means",
    "cmd",
    "cpr",
    "edge_circuit_metric",
    "edge_circuit_metrics",
    "faithfulness_curve",
    "greedy_edges",
    "node_circuit_metric",
    "node_faithfulness_curve",
    "prune_edges",
    "top_edges",
    "top_nodes",
]

#: The fractions of edges at which MIB's circuit track evaluates circuits.
MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

Ablation = Literal["corrupt", "mean"]
Ranking = Literal["abs", "max", "min"]
Selection = Literal["top", "pruned", "greedy"]


# ----------------------------------------------------------------------------------------------
# Edge masks: checks, discovery, pruning
# ----------------------------------------------------------------------------------------------


def _check_keep(graph: Graph, keep: Tensor, what: str = "keep") -> Tensor:
    """`keep` as a bool `[circuits, senders, receivers]` tensor (a single mask gets a leading
    axis), every True an edge of `graph`."""
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise ValueError(f"{what} must be a boolean tensor [senders, receivers] (EdgeScores.mask, "
                         f"top_edges), got {type(keep).__name__}"
                         + (f" of dtype {keep.dtype}" if isinstance(keep, Tensor) else ""))
    stacked = keep[None] if keep.ndim == 2 else keep
    if stacked.ndim != 3 or tuple(stacked.shape[1:]) != tuple(graph.mask.shape):
        raise ValueError(f"{what} must be [senders, receivers] = {tuple(graph.mask.shape)} for this "
                         f"graph (or a stack [circuits, senders, receivers]), got {tuple(keep.shape)}")
    stacked = stacked.cpu()
    stray = stacked & ~graph.mask
    if stray.any():
        c, s, r = stray.nonzero()[0].tolist()
        raise ValueError(f"{what} marks a pair that is no edge: {graph.senders[s].name} -> "
                         f"{graph.receivers[r].name} (circuit {c}); a sender reaches only receivers "
                         "that read after it writes (graph.mask)")
    return stacked


def _ranked_scores(edge_scores: EdgeScores, by: Ranking) -> tuple[EdgeScores, bool]:
    if by not in ("abs", "max", "min"):
        raise ValueError(f"by must be 'abs' (largest |score|), 'max' (most positive) or 'min' "
                         f"(most negative), got {by!r}")
    if by == "min":
        return replace(edge_scores, values=-edge_scores.values), False
    return edge_scores, by == "abs"


def top_edges(edge_scores: EdgeScores, n: int, by: Ranking = "abs") -> Bool[Tensor, "senders receivers"]:
    """The circuit of the `n` best-scored edges: by |score| (`by="abs"`), most positive
    (`"max"`) or most negative (`"min"`); ties keep edge order. Unscored edges are never
    chosen. A `[senders, receivers]` mask (`graph.mask` layout)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n must be an integer number of edges, got {n!r}")
    scores, absolute = _ranked_scores(edge_scores, by)
    return scores.mask(top_n=n, absolute=absolute)


def _receiver_nodes(graph: Graph) -> Int[Tensor, " receivers"]:
    """The sender index of each receiver's node; -1 for the logits."""
    return torch.tensor([-1 if r.node.kind == "logits" else graph.sender_index(r.node.name)
                         for r in graph.receivers])


def prune_edges(graph: Graph, keep: Bool[Tensor, "senders receivers"]) -> Bool[Tensor, "senders receivers"]:
    """The edges of `keep` that lie on some path from `input` to `logits` inside `keep`.

    An edge `s -> r` stays when its sender is reachable from `input` through kept edges and the
    node `r` belongs to reaches `logits` through kept edges. A head counts as reached when any
    of its inputs (q, k or v with `qkv_inputs`) has a kept edge from a reached sender. This is
    the fixed point of EAP-IG's / MIB's `prune` (repeatedly drop nodes without incoming or
    outgoing edges, then edges missing an end): in a DAG a node keeps both kinds of edges in
    the end exactly when it lies on an input-to-logits path.
    """
    if isinstance(keep, Tensor) and keep.ndim != 2:
        raise ValueError(f"keep must be one [senders, receivers] mask, got shape {tuple(keep.shape)}")
    keep = _check_keep(graph, keep)[0]
    node_of = _receiver_nodes(graph)
    n = graph.n_senders
    into = [(node_of == s).nonzero()[:, 0] for s in range(n)]  # receivers of each sender's node
    reached = torch.zeros(n, dtype=torch.bool)
    reached[0] = True  # input
    for s in range(1, n):  # senders are in write order: a node's inputs come from earlier ones
        reached[s] = bool((keep[:, into[s]] & reached[:, None]).any())
    to_logits = node_of == -1
    reaches = torch.zeros(n, dtype=torch.bool)
    for s in reversed(range(n)):
        heads_on = to_logits | torch.where(node_of >= 0, reaches[node_of.clamp(min=0)], False)
        reaches[s] = bool((keep[s] & heads_on).any())
    good_receiver = to_logits | torch.where(node_of >= 0, reaches[node_of.clamp(min=0)], False)
    return keep & reached[:, None] & good_receiver[None, :]


def greedy_edges(edge_scores: EdgeScores, n: int, by: Ranking = "abs",
                 prune: bool = True) -> Bool[Tensor, "senders receivers"]:
    """MIB's greedy circuit (EAP-IG's `apply_greedy`): start from the logits; repeatedly add
    the best-scored edge (by `by`, as in `top_edges`) into a node already in the circuit, and
    its sender to the circuit, `n` times (fewer when no scored edge is left to add). Then, with
    `prune`, `prune_edges` (a greedy circuit always reaches the logits but may start at a node
    with no kept input). Ties go to the lower edge number."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(edge_scores):
        raise ValueError(f"n must be an integer in [0, {len(edge_scores)}] (the scored edges), got {n!r}")
    scores, absolute = _ranked_scores(edge_scores, by)
    graph = scores.graph
    values = scores.flat().abs() if absolute else scores.flat()
    pairs = graph.pairs(scores.ids).tolist()
    node_of = _receiver_nodes(graph).tolist()
    by_node: dict[int, list[int]] = {}  # receiver node (sender index; -1 logits) -> scored rows
    for i, (_, r) in enumerate(pairs):
        by_node.setdefault(node_of[r], []).append(i)
    ids = scores.ids.tolist()
    heap: list[tuple[float, int, int]] = []

    def open_node(node: int) -> None:
        for i in by_node.get(node, []):
            heapq.heappush(heap, (-float(values[i]), ids[i], i))

    open_node(-1)
    in_circuit = {-1}
    keep = torch.zeros(graph.mask.shape, dtype=torch.bool)
    for _ in range(n):
        if not heap:
            break
        _, _, i = heapq.heappop(heap)
        s, r = pairs[i]
        keep[s, r] = True
        if s not in in_circuit:
            in_circuit.add(s)
            open_node(s)
    return prune_edges(graph, keep) if prune else keep


# ----------------------------------------------------------------------------------------------
# Evaluating edge circuits
# ----------------------------------------------------------------------------------------------


def _ablated_writes(
    model: HookedTransformer,
    graph: Graph,
    corrupt: Tensor,
    ablation: Ablation,
    mean_tokens: Tensor | None,
    mean_valid: Tensor | None,
) -> dict[str, Tensor]:
    """Each sender's ablated output by sender hook: `[batch or 1, pos, d_model]` for the
    input and MLPs, `[batch or 1, pos, head, d_model]` (`z_h @ W_O[h]`, before any norm) for
    heads. `"mean"`: the mean over the rows of `mean_tokens` at each position (rows count
    where `mean_valid` is True)."""
    acc = torch.promote_types(model.cfg.dtype, torch.float32)
    acts = capture_senders(model, graph, corrupt if ablation == "corrupt" else mean_tokens)
    if ablation == "mean":
        w = mean_valid.to(corrupt.device, acc)
        count = w.sum(0).clamp(min=1)
        means = {}
        for name, act in acts.items():
            ww = w.reshape(*w.shape, *([1] * (act.ndim - 2)))
            means[name] = ((act.to(acc) * ww).sum(0) / count.reshape(-1, *([1] * (act.ndim - 2))))[None]
        acts = means
    out = {}
    for name, act in acts.items():
        if hook_family(name) == "z":
            w_o = model.blocks[int(name.split(".")[1])].attn.W_O
            out[name] = einops.einsum(act.to(acc), w_o.to(acc), "b p h k, h k d -> b p h d")
        else:
            out[name] = act.to(acc)
    return out


def _circuits_per_pass(graph: Graph, batch: int, n_pos: int, d_model: int, memory_gb: float) -> int:
    """Circuits whose sender differences (`[senders, batch, pos, d_model]` float32 each, twice
    for the corrections built from them) fit `memory_gb`."""
    per_circuit = 2 * graph.n_senders * batch * n_pos * d_model * 4
    return max(1, int(memory_gb * 2**30 // per_circuit))


def _run_circuits(
    model: HookedTransformer,
    graph: Graph,
    clean: Int[Tensor, "batch pos"],
    metric: Metric,
    keep: Bool[Tensor, "circuits senders receivers"],
    ablated: dict[str, Tensor],
) -> Float[Tensor, "circuits batch"]:
    """The metric of each prompt with each circuit, in one forward pass of `circuits x batch`
    rows (the caller holds `receiver_inputs`)."""
    c, (batch, n_pos) = keep.shape[0], clean.shape
    cfg, device = model.cfg, clean.device
    acc = torch.promote_types(cfg.dtype, torch.float32)
    excluded = (graph.mask[None] & ~keep).to(device, acc)  # [c, senders, receivers]
    # Differences ablated - current, filled in as the senders run: [senders, c, batch, pos, d].
    diff = torch.zeros(graph.n_senders, c, batch, n_pos, cfg.d_model, dtype=acc, device=device)
    linear = torch.ones(graph.n_senders, dtype=acc, device=device)  # senders that add up
    head_slots: dict[int, slice] = {}
    for layer in range(graph.n_layers):
        first = graph.sender_index(f"a{layer}.h0")
        head_slots[layer] = slice(first, first + graph.n_heads)
        if graph.attn_out_norm:
            linear[head_slots[layer]] = 0.0
    attn_pre: dict[int, Tensor] = {}  # layer -> attention output before its norm, this run

    def split(act: Tensor) -> Tensor:
        return act.view(c, batch, *act.shape[1:])

    def on_input(act: Tensor, hook: HookPoint) -> None:
        diff[0] = ablated[RESID_0] - split(act).to(acc)

    def on_z(act: Tensor, hook: HookPoint, layer: int) -> None:
        attn = model.blocks[layer].attn
        mine = einops.einsum(split(act).to(acc), attn.W_O.to(acc), "c b p h k, h k d -> h c b p d")
        theirs = einops.rearrange(ablated[hook.name], "b p h d -> h b p d")
        diff[head_slots[layer]] = theirs[:, None] - mine
        if graph.attn_out_norm:
            attn_pre[layer] = einops.einsum(split(act), attn.W_O, "c b p h k, h k d -> c b p d") + attn.b_O

    def on_mlp(act: Tensor, hook: HookPoint, slot: int) -> None:
        diff[slot] = ablated[hook.name] - split(act).to(acc)

    cache: dict[tuple[int, ...], Tensor] = {}

    def correction(ids: tuple[int, ...], n_before: int) -> Tensor:
        """`[c, batch, pos, receivers, d]`: what each circuit adds to these receivers' inputs."""
        if ids in cache:
            return cache[ids]
        ex = excluded[:, :n_before, list(ids)]
        out = einops.einsum(ex * linear[None, :n_before, None], diff[:n_before],
                            "c s r, s c b p d -> c b p r d")
        if graph.attn_out_norm:
            for layer, hs in head_slots.items():
                if hs.stop > n_before:
                    break
                ex_h = ex[:, hs]
                if not ex_h.any():
                    continue
                norm = attn_out_norm(model, layer)
                a = attn_pre[layer]
                moved = a[:, :, :, None] + einops.einsum(ex_h, diff[hs], "c h r, h c b p d -> c b p r d").to(a.dtype)
                flat = einops.rearrange(moved, "c b p r d -> (c b r) p d").contiguous()
                normed = einops.rearrange(norm(flat), "(c b r) p d -> c b p r d", c=c, b=batch)
                plain = norm(a.flatten(0, 1).contiguous()).view_as(a)
                out = out + (normed.to(acc) - plain.to(acc)[:, :, :, None])
        cache[ids] = out
        return out

    def add_heads(act: Tensor, hook: HookPoint, ids: tuple[int, ...], n_before: int) -> Tensor:
        corr = einops.rearrange(correction(ids, n_before), "c b p r d -> (c b) p r d")
        return act + corr.to(act.dtype)

    def add_one(act: Tensor, hook: HookPoint, ids: tuple[int, ...], n_before: int) -> Tensor:
        corr = einops.rearrange(correction(ids, n_before)[:, :, :, 0], "c b p d -> (c b) p d")
        return act + corr.to(act.dtype)

    index = {r.name: i for i, r in enumerate(graph.receivers)}
    hooks: list = [(RESID_0, on_input)]
    for layer in range(graph.n_layers):
        hooks.append((f"blocks.{layer}.attn.hook_z", lambda a, hook, layer=layer: on_z(a, hook, layer)))
        for x in ("q", "k", "v"):
            ids = tuple(index[f"a{layer}.h{h}" + (f"<{x}>" if graph.qkv_inputs else "")]
                        for h in range(graph.n_heads))
            n_before = int(graph.n_senders_into[ids[0]])
            if excluded[:, :n_before, list(ids)].any():
                hooks.append((f"blocks.{layer}.hook_{x}_input",
                              lambda a, hook, ids=ids, n=n_before: add_heads(a, hook, ids, n)))
        if graph.has_mlp:
            slot = graph.sender_index(f"m{layer}")
            hooks.append((f"blocks.{layer}.hook_mlp_out", lambda a, hook, slot=slot: on_mlp(a, hook, slot)))
            ids = (index[f"m{layer}"],)
            n_before = int(graph.n_senders_into[ids[0]])
            if excluded[:, :n_before, list(ids)].any():
                hooks.append((f"blocks.{layer}.hook_mlp_in",
                              lambda a, hook, ids=ids, n=n_before: add_one(a, hook, ids, n)))
    ids = (index["logits"],)
    if excluded[:, :, list(ids)].any():
        hooks.append((f"blocks.{graph.n_layers - 1}.hook_resid_post",
                      lambda a, hook, ids=ids: add_one(a, hook, ids, graph.n_senders)))
    tokens = einops.repeat(clean, "b p -> (c b) p", c=c)
    rows_metric = metric.select(torch.arange(batch).repeat(c))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        values = rows_metric.on_model(model, tokens)
    return values.to(acc).view(c, batch)


def _prepare_edges(
    model: HookedTransformer,
    clean_tokens: Tensor,
    corrupt_tokens: Tensor,
    metric: MetricLike,
    graph: Graph,
    ablation: str,
    mean_tokens: Tensor | None,
) -> tuple[Tensor, Tensor, Metric, Tensor | None, Tensor | None]:
    metric = check_pairs(clean_tokens, corrupt_tokens, metric, model.cfg.d_vocab)
    if not isinstance(graph, Graph):
        raise ValueError(f"graph must be a Graph (Graph.from_model(model)), got {type(graph).__name__}")
    graph.check_model(model)
    if ablation not in ("corrupt", "mean"):
        raise ValueError(f"ablation must be 'corrupt' (each edge outside the circuit carries the "
                         f"corrupt run's value) or 'mean' (its mean over a reference batch), got {ablation!r}")
    device = model.cfg.device
    clean, corrupt = clean_tokens.to(device), corrupt_tokens.to(device)
    valid = None
    if ablation == "mean":
        n_pos = clean.shape[1]
        if mean_tokens is None:
            mean_tokens = torch.cat([clean, corrupt])
            ends = metric.positions(n_pos).cpu().repeat(2)
            valid = torch.arange(n_pos)[None, :] <= ends[:, None]
        else:
            if mean_tokens.ndim != 2 or mean_tokens.shape[1] != n_pos:
                raise ValueError(f"mean_tokens must be [rows, pos] with the prompts' {n_pos} positions, "
                                 f"got {tuple(mean_tokens.shape)}")
            valid = torch.ones(mean_tokens.shape, dtype=torch.bool)
        mean_tokens = mean_tokens.to(device)
    elif mean_tokens is not None:
        raise ValueError("mean_tokens is only used with ablation='mean'")
    return clean, corrupt, metric, mean_tokens, valid


def edge_circuit_metrics(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    graph: Graph,
    keep: Bool[Tensor, "*circuits senders receivers"],
    ablation: Ablation = "corrupt",
    mean_tokens: Int[Tensor, "rows pos"] | None = None,
    memory_gb: float = 1.0,
) -> Float[Tensor, " circuits"]:
    """The mean metric over the clean prompts of each circuit in `keep` (see the module
    docstring), several circuits per forward pass.

    Args:
        model: a causal HookedTransformer (config flags are restored on exit).
        clean_tokens, corrupt_tokens: `[batch, pos]`; the circuit runs on the clean prompts.
        metric: any `metrics.Metric` or a plain function of the full logits.
        graph: the `Graph` the masks refer to (`Graph.from_model(model)`, or with
            `qkv_inputs=True` for masks over q, k, v inputs apart).
        keep: `[circuits, senders, receivers]` (or one `[senders, receivers]` mask): True for
            the edges each circuit keeps (`top_edges`, `EdgeScores.mask`).
        ablation: `"corrupt"` (edges outside the circuit carry the corrupt prompt's sender
            output) or `"mean"` (the sender's mean output at that position over
            `mean_tokens`).
        mean_tokens: `[rows, pos]` the reference prompts of mean ablation; default the clean
            and corrupt prompts together, each position averaged over the prompts that reach
            it (the metric's `end_pos`).
        memory_gb: rough bound on the sender differences held per pass.
    """
    clean, corrupt, metric, mean_tokens, valid = _prepare_edges(
        model, clean_tokens, corrupt_tokens, metric, graph, ablation, mean_tokens)
    masks = _check_keep(graph, keep)
    batch, n_pos = clean.shape
    per_pass = _circuits_per_pass(graph, batch, n_pos, model.cfg.d_model, memory_gb)
    with receiver_inputs(model):
        ablated = _ablated_writes(model, graph, corrupt, ablation, mean_tokens, valid)
        out = [_run_circuits(model, graph, clean, metric, masks[lo:lo + per_pass], ablated).mean(1)
               for lo in range(0, len(masks), per_pass)]
    return torch.cat(out).cpu()


def edge_circuit_metric(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    graph: Graph,
    keep: Bool[Tensor, "senders receivers"],
    ablation: Ablation = "corrupt",
    mean_tokens: Int[Tensor, "rows pos"] | None = None,
) -> float:
    """The mean metric over the clean prompts with every edge outside `keep` ablated (one
    circuit; `edge_circuit_metrics` for several in one pass). Arguments as there."""
    if isinstance(keep, Tensor) and keep.ndim != 2:
        raise ValueError(f"keep must be one [senders, receivers] mask, got shape {tuple(keep.shape)}; "
                         "use edge_circuit_metrics for a stack of circuits")
    return float(edge_circuit_metrics(model, clean_tokens, corrupt_tokens, metric, graph, keep,
                                      ablation, mean_tokens)[0])


# ----------------------------------------------------------------------------------------------
# CPR / CMD and the edge faithfulness curve
# ----------------------------------------------------------------------------------------------


def _check_curve(x: Sequence[float], f: Sequence[float]) -> tuple[Tensor, Tensor]:
    xs, fs = torch.tensor(list(x), dtype=torch.float64), torch.tensor(list(f), dtype=torch.float64)
    if xs.ndim != 1 or xs.shape != fs.shape:
        raise ValueError(f"need one faithfulness per fraction, got {len(xs)} fractions and {len(fs)} values")
    if len(xs) < 2:
        raise ValueError("an area needs at least two points of the curve")
    if (xs < 0).any() or (xs > 1).any():
        raise ValueError(f"fractions of edges kept must lie in [0, 1], got {xs.tolist()}")
    if (xs[1:] < xs[:-1]).any():
        raise ValueError(f"fractions must be in increasing order, got {xs.tolist()}")
    return xs, fs


def cpr(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """MIB's circuit performance ratio: the area under the faithfulness curve, trapezoid rule
    over the given points (`fractions` of edges kept, increasing, in [0, 1])."""
    xs, fs = _check_curve(fractions, faithfulness)
    return float(torch.trapezoid(fs, xs))


def cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """MIB's circuit-model distance: the area between the faithfulness curve and 1, the
    trapezoid rule applied to `|1 - f|` over the given points."""
    xs, fs = _check_curve(fractions, faithfulness)
    return float(torch.trapezoid((1 - fs).abs(), xs))


@dataclass
class EdgeFaithfulnessCurve:
    """Faithfulness of the circuits of one method's top edges, by circuit size.

    Attributes:
        method: the attribution method that ranked the edges.
        counts: edges requested for each circuit (the top `n`).
        fractions: the x axis, `n / n_edges` (or the nominal fractions asked for).
        kept: edges in each circuit after pruning (`counts` without pruning).
        metric: `m(C_n)`, the mean metric of each circuit.
        faithfulness: `(m(C_n) - m_empty) / (m_full - m_empty)`.
        m_full, m_empty: the clean run's metric, and with every edge ablated.
        n_edges: the graph's edges.
        selection: `top`, `pruned` or `greedy`; by: the ranking (`abs`, `max`, `min`).
        ablation: `corrupt` or `mean`.
        cpr, cmd: MIB's areas over (`fractions`, `faithfulness`).
    """

    method: str
    counts: list[int]
    fractions: list[float]
    kept: list[int]
    metric: list[float]
    faithfulness: list[float]
    m_full: float
    m_empty: float
    n_edges: int
    selection: str
    by: str
    ablation: str
    cpr: float
    cmd: float

    def to_dict(self) -> dict:
        return asdict(self)


def faithfulness_curve(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    edge_scores: EdgeScores,
    ns: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
    selection: Selection = "pruned",
    by: Ranking = "abs",
    ablation: Ablation = "corrupt",
    mean_tokens: Int[Tensor, "rows pos"] | None = None,
    memory_gb: float = 1.0,
) -> EdgeFaithfulnessCurve:
    """Faithfulness of the top-`n` edge circuits of `edge_scores` for each size, with MIB's
    CPR and CMD (see the module docstring for the definitions and how they match MIB).

    Args:
        model, clean_tokens, corrupt_tokens, metric: as in `edge_circuit_metrics`.
        edge_scores: a method's `EdgeScores` (`eap`, `eap_ig`, `exact_edge_patching`, ...);
            their graph is the circuit's graph.
        ns: circuit sizes in edges, increasing (x = n / n_edges). Or:
        fractions: fractions of the graph's edges, increasing, in [0, 1]; the circuit keeps
            `int(fraction * n_edges)` edges and x is the fraction itself. Default (neither
            given): `MIB_FRACTIONS`.
        selection: `"pruned"` (top-n, then `prune_edges`: MIB's default), `"top"` (top-n as
            they are) or `"greedy"` (`greedy_edges`, pruned).
        by: rank by `"abs"` |score| (MIB's CMD), `"max"` signed score (MIB's CPR, for denoise
            scores) or `"min"` (the same for noise scores).
        ablation, mean_tokens, memory_gb: as in `edge_circuit_metrics`.
    """
    if not isinstance(edge_scores, EdgeScores):
        raise ValueError(f"edge_scores must be EdgeScores (from eap, eap_ig, exact_edge_patching, ...), "
                         f"got {type(edge_scores).__name__}")
    if selection not in ("top", "pruned", "greedy"):
        raise ValueError(f"selection must be 'top', 'pruned' or 'greedy', got {selection!r}")
    graph = edge_scores.graph
    total = graph.n_edges
    if ns is not None and fractions is not None:
        raise ValueError("give either ns (edge counts) or fractions, not both")
    if ns is not None:
        counts = [int(n) for n in ns]
        xs = [n / total for n in counts]
    else:
        xs = [float(x) for x in (MIB_FRACTIONS if fractions is None else fractions)]
        counts = [int(x * total) for x in xs]
    if not counts:
        raise ValueError("no circuit sizes given")
    if any(b < a for a, b in zip(xs, xs[1:])) or xs[0] < 0 or xs[-1] > 1:
        raise ValueError(f"circuit sizes must be increasing and within the graph's {total} edges "
                         f"(fractions in [0, 1]); got {ns if ns is not None else fractions}")
    if counts[-1] > len(edge_scores):
        raise ValueError(f"the largest circuit asks for {counts[-1]} edges but only {len(edge_scores)} "
                         f"of the graph's {total} edges are scored")

    def circuit(n: int) -> Tensor:
        if selection == "greedy":
            return greedy_edges(edge_scores, n, by=by)
        mask = top_edges(edge_scores, n, by=by)
        return prune_edges(graph, mask) if selection == "pruned" else mask

    masks = torch.stack([torch.zeros_like(graph.mask)] + [circuit(n) for n in counts])
    values = edge_circuit_metrics(model, clean_tokens, corrupt_tokens, metric, graph, masks,
                                  ablation=ablation, mean_tokens=mean_tokens, memory_gb=memory_gb)
    m_empty = float(values[0])
    bound = check_pairs(clean_tokens, corrupt_tokens, metric, model.cfg.d_vocab)
    with torch.no_grad():
        m_full = bound.on_model(model, clean_tokens.to(model.cfg.device)).float().mean().item()
    if abs(m_full - m_empty) < 1e-9:
        raise ValueError("ablating every edge leaves the metric unchanged, so faithfulness is "
                         "undefined: the clean and ablated runs agree on this metric")
    metrics = values[1:].tolist()
    faith = [(v - m_empty) / (m_full - m_empty) for v in metrics]
    return EdgeFaithfulnessCurve(
        method=edge_scores.method, counts=counts, fractions=xs,
        kept=[int(m.sum()) for m in masks[1:]], metric=metrics, faithfulness=faith,
        m_full=m_full, m_empty=m_empty, n_edges=total, selection=selection, by=by,
        ablation=ablation, cpr=cpr(xs, faith), cmd=cmd(xs, faith),
    )


# ----------------------------------------------------------------------------------------------
# Node circuits (site families: SAE latents and error nodes, heads, ...)
# ----------------------------------------------------------------------------------------------


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


def node_circuit_metric(
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
class NodeFaithfulnessCurve:
    """Faithfulness of the top-`n` node circuits of one attribution method.

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


def node_faithfulness_curve(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    scores: Mapping[str, Scores],
    fams: Sequence[SiteFamily],
    counts: Sequence[int],
    means: Mapping[str, Float[Tensor, "pos ..."]],
) -> NodeFaithfulnessCurve:
    """Faithfulness of the circuits of the top-`n` nodes by |score|, for each `n` in `counts`.

    Args:
        tokens: the prompts on which the circuit is evaluated (usually the clean ones).
        metric: their metric, any `interp.attribution.metrics.Metric` or a plain function of
            the full logits (normalised or not: faithfulness is a ratio of differences).
        scores: a method's `Scores` per family of `fams` (e.g. from `relp`).
        fams: the node families (e.g. `interp.saes.latent_families(model)`); all their nodes
            can be ablated.
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
    m_empty = node_circuit_metric(model, tokens, metric, fams, {}, means)
    if abs(m_full - m_empty) < 1e-9:
        raise ValueError("ablating every node leaves the metric unchanged, so faithfulness is "
                         "undefined; the SAEs' hook points do not carry this behaviour")
    values = [node_circuit_metric(model, tokens, metric, fams, top_nodes(ranked, int(n)), means)
              for n in counts]
    method = next(iter(ranked.values())).method
    return NodeFaithfulnessCurve(
        method=method, counts=[int(n) for n in counts], metric=values,
        faithfulness=[(v - m_empty) / (m_full - m_empty) for v in values],
        m_full=m_full, m_empty=m_empty, n_nodes=n_nodes,
    )
