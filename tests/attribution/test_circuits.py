"""Edge circuits: the circuit metric against the clean and corrupt runs, exact edge patching and
runs hooked by hand with TransformerLens; pruning and greedy selection on hand-made masks; CPR
and CMD against hand-computed trapezoids; the node-circuit tools' move from `saes.circuits`."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp import models
from interp.attribution.circuits import (
    MIB_FRACTIONS,
    cmd,
    cpr,
    edge_circuit_metric,
    edge_circuit_metrics,
    faithfulness_curve,
    greedy_edges,
    prune_edges,
    top_edges,
)
from interp.attribution.edges import exact_edge_patching
from interp.attribution.graph import EdgeScores, Graph

# ----------------------------------------------------------------------------------------------
# Hand references
# ----------------------------------------------------------------------------------------------


@contextmanager
def split_inputs(model):
    """TransformerLens's own flags for per-head inputs, per-head results and the MLP input."""
    cfg = model.cfg
    names = ("use_split_qkv_input", "use_hook_mlp_in", "use_attn_result",
             "ungroup_grouped_query_attention")
    saved = {n: getattr(cfg, n) for n in names}
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    if cfg.n_key_value_heads is not None:
        model.set_ungroup_grouped_query_attention(True)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(cfg, n, v)


def mask_of(graph, names):
    """A [senders, receivers] mask with exactly the named edges."""
    keep = torch.zeros_like(graph.mask)
    for name in names:
        s, r = graph.pairs(torch.tensor([graph.edge_index(name)]))[0].tolist()
        keep[s, r] = True
    return keep


def without(graph, names):
    """Every edge but the named ones."""
    return graph.mask & ~mask_of(graph, names)


def names_of(graph, keep):
    """The names of the edges a mask keeps (`keep[graph.mask]` lists them in edge order)."""
    return set(graph.edge_names(keep[graph.mask].nonzero()[:, 0]))


def post_norm_model():
    """A tiny random model with Gemma's extra norms (ln1_post, ln2_post) and GQA."""
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8,
                                  d_mlp=48, n_ctx=16, d_vocab=50, act_fn="gelu", normalization_type="RMS",
                                  use_normalization_before_and_after=True, positional_embedding_type="rotary",
                                  rotary_dim=8, seed=3)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.uniform_(0.5, 1.5)
    return model


def plain_mean(metric_values):
    return metric_values.float().mean().item()


# ----------------------------------------------------------------------------------------------
# (a) full circuit = clean run, empty circuit = corrupt run
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,qkv", [("tiny-llama", False), ("tiny-gpt2", True), ("post-norm", False)])
def test_full_circuit_is_the_clean_run_and_empty_the_corrupt_run(name, qkv, random_pairs,
                                                                last_logit_diff):
    """All edges kept: nothing changes. No edge kept: the logits read the sum of the corrupt
    senders' outputs, which is the corrupt run's final residual stream (biases agree), so the
    metric is the corrupt run's. Reference: TransformerLens's own forward passes."""
    model = post_norm_model() if name == "post-norm" else models.load(name)
    clean, corrupt, metric = random_pairs(model)
    graph = Graph.from_model(model, qkv_inputs=qkv)
    with torch.no_grad():
        m_clean = plain_mean(last_logit_diff(model(clean), metric))
        m_corrupt = plain_mean(last_logit_diff(model(corrupt), metric))
    assert abs(m_clean - m_corrupt) > 0.5  # normalised: 1 and 0
    got = edge_circuit_metrics(model, clean, corrupt, metric, graph,
                               torch.stack([graph.mask, torch.zeros_like(graph.mask)]))
    assert got[0].item() == pytest.approx(m_clean, abs=1e-4)
    assert got[1].item() == pytest.approx(m_corrupt, abs=1e-4)
    # only the logits' inputs matter for the empty circuit: ablating just those is the same
    no_logits = graph.mask.clone()
    no_logits[:, -1] = False
    assert edge_circuit_metric(model, clean, corrupt, metric, graph, no_logits) == pytest.approx(
        m_corrupt, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# (b) one edge excluded = exact edge patching of that edge (noise direction)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,qkv", [("tiny-llama", False), ("tiny-llama", True), ("post-norm", False)])
def test_one_edge_excluded_is_exact_edge_patching(name, qkv, random_pairs):
    """A circuit missing edge e runs the clean prompt with e's sender difference
    (corrupt - clean) added at e's receiver only: `exact_edge_patching(direction="noise")`,
    which starts from cached states and runs only the blocks after the receiver."""
    model = post_norm_model() if name == "post-norm" else models.load(name)
    clean, corrupt, metric = random_pairs(model)
    graph = Graph.from_model(model, qkv_inputs=qkv)
    edges = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(1))[:12].sort().values
    edges = torch.cat([edges, graph.select(sender="a0.*", receiver="m0")[:1],
                       graph.select(receiver="logits")[-2:]]).unique()
    names = graph.edge_names(edges)
    exact = exact_edge_patching(model, clean, corrupt, metric, graph, direction="noise",
                                edges=names, progress=False)
    masks = torch.stack([graph.mask] + [without(graph, [n]) for n in names])
    got = edge_circuit_metrics(model, clean, corrupt, metric, graph, masks)
    effects = got[1:] - got[0]
    torch.testing.assert_close(effects, exact.values.float(), atol=2e-5, rtol=1e-4)
    assert exact.values.abs().max() > 1e-3
    one_by_one = edge_circuit_metrics(model, clean, corrupt, metric, graph, masks, memory_gb=1e-6)
    torch.testing.assert_close(one_by_one, got, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# (c) two edges excluded, against a run hooked by hand
# ----------------------------------------------------------------------------------------------


def test_two_edges_excluded_equal_a_hand_hooked_run(random_pairs, last_logit_diff):
    """Exclude `input->a1.h2` and `a1.h2->logits` on tiny-llama (GQA). By hand, with
    TransformerLens's split q/k/v inputs and per-head results: head 2 of layer 1 reads the
    corrupt embeddings (q, k and v), and the logits read the final stream with a1.h2's output
    *in this run* swapped for its corrupt output. The second exclusion's sender is downstream of
    the first, so using the clean run's a1.h2 output instead would differ (checked)."""
    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    graph = Graph.from_model(model)
    got = edge_circuit_metric(model, clean, corrupt, metric, graph,
                              without(graph, ["input->a1.h2", "a1.h2->logits"]))

    with split_inputs(model), torch.no_grad():
        _, c_cache = model.run_with_cache(corrupt)
        _, k_cache = model.run_with_cache(clean)
        emb_c = c_cache["blocks.0.hook_resid_pre"]
        res_c = c_cache["blocks.1.attn.hook_result"][:, :, 2]
        kept = {}

        def at_embed(act, hook):
            kept["emb"] = act.clone()

        def head_input(act, hook):
            act = act.clone()
            act[:, :, 2] += emb_c - kept["emb"]
            return act

        def keep_result(act, hook):
            kept["res"] = act[:, :, 2].clone()

        def final(act, hook, source):
            return act + res_c - source()

        def run(source):
            hooks = [("blocks.0.hook_resid_pre", at_embed), ("blocks.1.attn.hook_result", keep_result)]
            hooks += [(f"blocks.1.hook_{x}_input", head_input) for x in "qkv"]
            hooks.append(("blocks.1.hook_resid_post", lambda a, hook: final(a, hook, source)))
            return plain_mean(last_logit_diff(model.run_with_hooks(clean, fwd_hooks=hooks), metric))

        expected = run(lambda: kept["res"])
        other = run(lambda: k_cache["blocks.1.attn.hook_result"][:, :, 2])
    assert got == pytest.approx(expected, abs=1e-5)
    assert abs(expected - other) > 1e-3


# ----------------------------------------------------------------------------------------------
# (d) CPR and CMD
# ----------------------------------------------------------------------------------------------


def test_cpr_and_cmd_are_trapezoid_areas():
    # f rises linearly to 1 at half the edges, then stays: areas 0.25 + 0.5 and 0.25
    assert cpr([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75)
    assert cmd([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.25)
    # overshoot counts against CMD: |1 - f| = 0.8, 0.4, 0
    x, f = [0.1, 0.4, 1.0], [0.2, 1.4, 1.0]
    assert cpr(x, f) == pytest.approx(0.3 * (0.2 + 1.4) / 2 + 0.6 * (1.4 + 1.0) / 2)  # 0.96
    assert cmd(x, f) == pytest.approx(0.3 * (0.8 + 0.4) / 2 + 0.6 * (0.4 + 0.0) / 2)  # 0.30
    # a negative stretch lowers CPR and raises CMD
    assert cpr([0, 1], [-1, 1]) == pytest.approx(0.0)
    assert cmd([0, 1], [-1, 1]) == pytest.approx(1.0)
    # MIB's points start at 0.1%: a perfect curve scores 0.999, not 1
    assert cpr(MIB_FRACTIONS, [1.0] * 10) == pytest.approx(0.999)
    assert cmd(MIB_FRACTIONS, [1.0] * 10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="increasing"):
        cpr([0.5, 0.1], [1, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cmd([0, 2], [1, 1])
    with pytest.raises(ValueError, match="one faithfulness per fraction"):
        cpr([0, 1], [1])
    with pytest.raises(ValueError, match="at least two points"):
        cpr([1], [1])


def test_faithfulness_curve_end_points_and_areas(random_pairs, last_logit_diff):
    """On tiny-llama with exact edge scores: the empty circuit is 0, all edges 1; m_full and
    m_empty are the clean and corrupt runs; the areas are the trapezoids of the curve's own
    points (numpy); pruning never keeps more edges than asked for."""
    import numpy as np

    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    graph = Graph.from_model(model)
    scores = exact_edge_patching(model, clean, corrupt, metric, graph, direction="noise", progress=False)
    ns = [0, 3, 10, 25, graph.n_edges]
    curve = faithfulness_curve(model, clean, corrupt, metric, scores, ns=ns)
    with torch.no_grad():
        assert curve.m_full == pytest.approx(plain_mean(last_logit_diff(model(clean), metric)), abs=1e-5)
        assert curve.m_empty == pytest.approx(plain_mean(last_logit_diff(model(corrupt), metric)), abs=1e-4)
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-4)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    assert curve.fractions == [n / graph.n_edges for n in ns]
    assert all(k <= n for k, n in zip(curve.kept, curve.counts)) and curve.kept[-1] == graph.n_edges
    f, x = np.array(curve.faithfulness), np.array(curve.fractions)
    trap = np.trapezoid if hasattr(np, "trapezoid") else np.trapz
    assert curve.cpr == pytest.approx(float(trap(f, x)), abs=1e-9)
    assert curve.cmd == pytest.approx(float(trap(np.abs(1 - f), x)), abs=1e-9)
    # each point is the circuit metric of its (pruned) top-n circuit
    n = 10
    direct = edge_circuit_metric(model, clean, corrupt, metric, graph,
                                 prune_edges(graph, top_edges(scores, n)))
    assert curve.metric[2] == pytest.approx(direct, abs=1e-6)
    # with corrupt ablation pruning leaves the metric as it is: a node cut off from the input
    # reads only corrupt values, so its kept edges carry its corrupt output anyway
    for k in (3, 10, 25):
        raw = top_edges(scores, k, by="max")
        pruned = prune_edges(graph, raw)
        assert pruned.sum() < raw.sum()
        both = edge_circuit_metrics(model, clean, corrupt, metric, graph, torch.stack([raw, pruned]))
        assert both[0].item() == pytest.approx(both[1].item(), abs=1e-5)
    # MIB's default points: counts are floor(fraction * n_edges), x the nominal fraction
    mib = faithfulness_curve(model, clean, corrupt, metric, scores, selection="top")
    assert mib.fractions == list(MIB_FRACTIONS)
    assert mib.counts == [int(x * graph.n_edges) for x in MIB_FRACTIONS]
    assert mib.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# (e) discovery: top-n, pruning, greedy
# ----------------------------------------------------------------------------------------------


def test_pruning_keeps_exactly_the_edges_on_input_to_logits_paths():
    graph = Graph(n_layers=2, n_heads=4, qkv_inputs=True)
    on_paths = {
        "input->a0.h0<q>", "a0.h0->m1", "m1->logits",  # a path through an MLP
        "input->logits",  # the direct path
        "input->a1.h1<k>", "a1.h1->logits",  # a head reached through its key input only
        "a0.h0->a1.h3<v>", "a1.h3->m1",  # joins a kept path
    }
    off_paths = {
        "a0.h1->logits",  # a0.h1 receives nothing
        "input->a0.h2<v>",  # a0.h2 sends nowhere
        "input->a0.h3<k>", "a0.h3->a1.h0<q>",  # a dead end two edges long
        "m0->a1.h2<q>", "a1.h2->logits",  # starts at m0, which receives nothing
    }
    pruned = prune_edges(graph, mask_of(graph, on_paths | off_paths))
    assert names_of(graph, pruned) == on_paths
    assert names_of(graph, prune_edges(graph, mask_of(graph, on_paths))) == on_paths
    assert not prune_edges(graph, mask_of(graph, off_paths)).any()
    assert (prune_edges(graph, graph.mask) == graph.mask).all()


def test_top_and_greedy_selection_on_hand_made_scores():
    """Greedy grows from the logits: the best edge into a node already in the circuit each
    step. Traced by hand: a1.h0->logits (5), input->logits (4), a0.h1->a1.h0 (3), m1->logits
    (2), input->a0.h1 (1); a0.h2->m0 (10) is never adjacent. Pruning then drops m1->logits
    (m1 receives nothing). Top-5 by |score| takes a0.h2->m0 first."""
    graph = Graph(n_layers=2, n_heads=4)
    values = torch.zeros(graph.n_edges)
    chosen = {"a1.h0->logits": 5.0, "input->logits": -4.0, "a0.h1->a1.h0": 3.0, "m1->logits": 2.0,
              "input->a0.h1": 1.0, "a0.h2->m0": -10.0}
    for name, v in chosen.items():
        values[graph.edge_index(name)] = v
    scores = EdgeScores(graph, torch.arange(graph.n_edges), values, "hand")
    greedy = greedy_edges(scores, 5, prune=False)
    assert names_of(graph, greedy) == set(chosen) - {"a0.h2->m0"}
    assert names_of(graph, greedy_edges(scores, 5)) == set(chosen) - {"a0.h2->m0", "m1->logits"}
    assert names_of(graph, top_edges(scores, 5)) == set(chosen) - {"input->a0.h1"}
    assert names_of(graph, top_edges(scores, 2, by="max")) == {"a1.h0->logits", "a0.h1->a1.h0"}
    assert names_of(graph, top_edges(scores, 2, by="min")) == {"a0.h2->m0", "input->logits"}
    # signed greedy skips the negative input->logits
    assert "input->logits" not in names_of(graph, greedy_edges(scores, 4, by="max", prune=False))


# ----------------------------------------------------------------------------------------------
# (f) mean ablation
# ----------------------------------------------------------------------------------------------


def test_mean_ablation_against_hand_computations(random_pairs, last_logit_diff):
    """Reference batch: clean and corrupt prompts together, mean per position.
    (1) Every edge into the logits ablated: the logits read the mean final residual stream
    (the sum of the senders' means), so every prompt sees `unembed(ln_final(mean resid))`.
    (2) Only a0.h1->m1 ablated: the clean run with (mean - own) a0.h1 result added at m1's
    input, by TransformerLens's hook_result and hook_mlp_in."""
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = random_pairs(model)
    graph = Graph.from_model(model)
    both = torch.cat([clean, corrupt])
    with split_inputs(model), torch.no_grad():
        _, cache = model.run_with_cache(both)
        mean_final = cache["blocks.1.hook_resid_post"].mean(0, keepdim=True)
        logits = model.unembed(model.ln_final(mean_final)).expand(clean.shape[0], -1, -1)
        expected_logits = plain_mean(last_logit_diff(logits, metric))
        mean_head = cache["blocks.0.attn.hook_result"][:, :, 1].mean(0)
        kept = {}

        def keep_result(act, hook):
            kept["res"] = act[:, :, 1].clone()

        def mlp_in(act, hook):
            return act + mean_head - kept["res"]

        hooked = model.run_with_hooks(clean, fwd_hooks=[("blocks.0.attn.hook_result", keep_result),
                                                        ("blocks.1.hook_mlp_in", mlp_in)])
        expected_edge = plain_mean(last_logit_diff(hooked, metric))
    no_logits = graph.mask.clone()
    no_logits[:, -1] = False
    got = edge_circuit_metrics(model, clean, corrupt, metric, graph,
                               torch.stack([no_logits, without(graph, ["a0.h1->m1"])]), ablation="mean")
    assert got[0].item() == pytest.approx(expected_logits, abs=1e-4)
    assert got[1].item() == pytest.approx(expected_edge, abs=1e-5)
    # an explicit reference batch gives the same numbers
    again = edge_circuit_metric(model, clean, corrupt, metric, graph, without(graph, ["a0.h1->m1"]),
                                ablation="mean", mean_tokens=both)
    assert again == pytest.approx(expected_edge, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Errors, and the node tools' move
# ----------------------------------------------------------------------------------------------


def test_bad_input_errors(random_pairs):
    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    graph = Graph.from_model(model)
    stray = graph.mask.clone()
    stray[-1, 0] = True  # m1 -> a0.h0 is no edge
    with pytest.raises(ValueError, match="no edge: m1 -> a0.h0"):
        edge_circuit_metric(model, clean, corrupt, metric, graph, stray)
    with pytest.raises(ValueError, match="mean_tokens is only used"):
        edge_circuit_metric(model, clean, corrupt, metric, graph, graph.mask, mean_tokens=clean)
    scores = EdgeScores(graph, torch.arange(graph.n_edges), torch.randn(graph.n_edges), "rand")
    with pytest.raises(ValueError, match="either ns"):
        faithfulness_curve(model, clean, corrupt, metric, scores, ns=[1], fractions=[0.5])
    with pytest.raises(ValueError, match="increasing"):
        faithfulness_curve(model, clean, corrupt, metric, scores, ns=[5, 2])
    with pytest.raises(ValueError, match="only 3 of the graph's"):
        faithfulness_curve(model, clean, corrupt, metric, replace_ids(scores, 3), ns=[1, 5])
    with pytest.raises(ValueError, match=r"n must be an integer in \[0, 54\]"):
        greedy_edges(scores, 99)


def replace_ids(scores, k):
    from dataclasses import replace

    return replace(scores, ids=scores.ids[:k], values=scores.values[:k])


@pytest.mark.unchecked
def test_wrongly_typed_options_get_clear_errors(random_pairs):
    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    graph = Graph.from_model(model)
    with pytest.raises(ValueError, match="boolean tensor"):
        edge_circuit_metric(model, clean, corrupt, metric, graph, graph.mask.float())
    with pytest.raises(ValueError, match=r"must be \[senders, receivers\]"):
        edge_circuit_metrics(model, clean, corrupt, metric, graph, graph.mask[:, :3])
    with pytest.raises(ValueError, match="use edge_circuit_metrics"):
        edge_circuit_metric(model, clean, corrupt, metric, graph, graph.mask[None])
    with pytest.raises(ValueError, match="ablation must be 'corrupt'"):
        edge_circuit_metric(model, clean, corrupt, metric, graph, graph.mask, ablation="zero")
    with pytest.raises(ValueError, match="mean_tokens must be"):
        edge_circuit_metric(model, clean, corrupt, metric, graph, graph.mask, ablation="mean",
                            mean_tokens=clean[:, :3])
    scores = EdgeScores(graph, torch.arange(graph.n_edges), torch.randn(graph.n_edges), "rand")
    with pytest.raises(ValueError, match="selection must be"):
        faithfulness_curve(model, clean, corrupt, metric, scores, ns=[1], selection="best")
    with pytest.raises(ValueError, match="by must be"):
        top_edges(scores, 3, by="largest")


def test_node_tools_moved_and_still_importable_from_saes():
    import interp.attribution.circuits as general
    import interp.saes.circuits as saes

    assert saes.top_nodes is general.top_nodes
    assert saes.ablation_means is general.ablation_means
    assert saes.circuit_metric is general.node_circuit_metric
    assert saes.faithfulness_curve is general.node_faithfulness_curve
    assert saes.FaithfulnessCurve is general.NodeFaithfulnessCurve


@pytest.mark.cuda
@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_circuit_metrics_on_cuda_give_the_cpu_numbers(ablation, device, random_pairs):
    cpu_model = models.load("tiny-llama", device="cpu")
    gpu_model = models.load("tiny-llama", device=device)
    clean, corrupt, metric = random_pairs(cpu_model)
    graph = Graph.from_model(cpu_model)
    gen = torch.Generator().manual_seed(2)
    masks = torch.stack([graph.mask & (torch.rand(graph.mask.shape, generator=gen) < p)
                         for p in (0.0, 0.3, 0.7, 1.0)])
    cpu = edge_circuit_metrics(cpu_model, clean, corrupt, metric, graph, masks, ablation=ablation)
    gpu = edge_circuit_metrics(gpu_model, clean, corrupt, metric, graph, masks, ablation=ablation)
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
