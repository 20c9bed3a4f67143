"""The graph of a model and its edge scores: exact edge patching against runs hooked by hand
with TransformerLens, EAP/EAP-IG/RelP against plain autograd, EAP = exact on a linear model."""

from __future__ import annotations

import re
from contextlib import contextmanager

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp import models
from interp.attribution.edges import eap, eap_ig, exact_edge_patching, relp_edges
from interp.attribution.graph import EdgeScores, Graph
from interp.attribution.lrp import LRPRules, lrp_rules
from interp.attribution.metrics import CallableMetric, LogitDiff, LogSumExpDiff

# ----------------------------------------------------------------------------------------------
# Hand references: TransformerLens's own split inputs and per-head results, plain autograd
# ----------------------------------------------------------------------------------------------


@contextmanager
def split_inputs(model):
    """TransformerLens's flags for per-head inputs, per-head results and the MLP input."""
    cfg = model.cfg
    names = ("use_split_qkv_input", "use_hook_mlp_in", "use_attn_result",
             "ungroup_grouped_query_attention")
    saved = {n: getattr(cfg, n) for n in names}
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    if not cfg.attn_only:
        model.set_use_hook_mlp_in(True)
    if cfg.n_key_value_heads is not None:
        model.set_ungroup_grouped_query_attention(True)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(cfg, n, v)


def hand_outputs(model, tokens):
    """Each sender's output, by name: hook_resid_pre of layer 0, each head's hook_result, each
    hook_mlp_out."""
    with split_inputs(model), torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    out = {"input": cache["blocks.0.hook_resid_pre"]}
    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            out[f"a{layer}.h{h}"] = cache[f"blocks.{layer}.attn.hook_result"][:, :, h]
        if not model.cfg.attn_only:
            out[f"m{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
    return out


def hand_deltas(model, source, target, post_norm=False):
    """source minus target output per sender. With a normalised attention output (post_norm)
    a head's difference is measured: the target run with that head's z from the source run,
    its hook_attn_out minus the target's."""
    src, tgt = hand_outputs(model, source), hand_outputs(model, target)
    deltas = {k: src[k] - tgt[k] for k in src}
    if post_norm:
        with torch.no_grad():
            _, s_cache = model.run_with_cache(source)
            _, t_cache = model.run_with_cache(target)
            for layer in range(model.cfg.n_layers):
                z = f"blocks.{layer}.attn.hook_z"
                for h in range(model.cfg.n_heads):
                    def swap(act, hook, h=h):
                        act = act.clone()
                        act[:, :, h] = s_cache[hook.name][:, :, h]
                        return act
                    out = f"blocks.{layer}.hook_attn_out"
                    with model.hooks(fwd_hooks=[(z, swap)]):
                        _, cache = model.run_with_cache(target, names_filter=out)
                    deltas[f"a{layer}.h{h}"] = cache[out] - t_cache[out]
    return deltas


def receiver_hooks(model, receiver):
    """(hook name, head or None) where the receiver reads its input."""
    if receiver == "logits":
        return [(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None)]
    m = re.fullmatch(r"m(\d+)", receiver)
    if m:
        return [(f"blocks.{m[1]}.hook_mlp_in", None)]
    m = re.fullmatch(r"a(\d+)\.h(\d+)(?:<([qkv])>)?", receiver)
    letters = [m[3]] if m[3] else ["q", "k", "v"]
    return [(f"blocks.{m[1]}.hook_{x}_input", int(m[2])) for x in letters]


def hand_patched_score(model, target, deltas, edge, metric_fn):
    """Mean over prompts of metric(target run with delta_s added at r's input only) minus
    metric(target run)."""
    sender, receiver = edge.split("->")

    def add(act, hook, head):
        act = act.clone()
        if head is None:
            act += deltas[sender]
        else:
            act[:, :, head] += deltas[sender]
        return act

    hooks = [(name, lambda act, hook, head=head: add(act, hook, head))
             for name, head in receiver_hooks(model, receiver)]
    with split_inputs(model), torch.no_grad():
        base = metric_fn(model(target))
        patched = metric_fn(model.run_with_hooks(target, fwd_hooks=hooks))
    return (patched - base).mean().item()


def hand_grads(model, target, metric_fn, interpolate=None):
    """d mean(metric) / d every receiver input hook (split inputs), by torch.autograd.grad."""
    names = []
    for layer in range(model.cfg.n_layers):
        names += [f"blocks.{layer}.hook_{x}_input" for x in "qkv"]
        if not model.cfg.attn_only:
            names.append(f"blocks.{layer}.hook_mlp_in")
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    kept = {}

    def leaf(act, hook):
        return act.detach().requires_grad_(True)

    def keep(act, hook):
        kept[hook.name] = act

    hooks = [("hook_embed", leaf)] + ([interpolate] if interpolate else []) + [(n, keep) for n in names]
    with split_inputs(model), torch.enable_grad():
        logits = model.run_with_hooks(target, fwd_hooks=hooks)
        grads = torch.autograd.grad(metric_fn(logits).mean(), [kept[n] for n in names])
    return dict(zip(names, grads))


def hand_eap_score(model, deltas, grads, edge):
    sender, receiver = edge.split("->")
    total = 0.0
    for name, head in receiver_hooks(model, receiver):
        g = grads[name] if head is None else grads[name][:, :, head]
        total += (deltas[sender] * g).sum().item()
    return total


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def pairs(model, batch=3, pos=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupt = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    answer = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    return clean, corrupt, answer, (answer + 1) % model.cfg.d_vocab


def logit_diff_fn(answer, wrong):
    def fn(logits):
        rows = torch.arange(logits.shape[0])
        return logits[rows, -1, answer] - logits[rows, -1, wrong]
    return fn


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
                p.uniform_(0.5, 1.5)  # norm scales that are not all ones
    return model


def linear_edge_model():
    """No norms, W_Q = W_K = 0 (every pattern is the fixed uniform causal one), the MLP
    activation replaced by the identity: the logits are affine in every receiver's input, so
    the metric (a logit difference) is linear in every edge's contribution."""
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=48, n_ctx=16,
                                  d_vocab=50, act_fn="relu", normalization_type=None, seed=2,
                                  dtype=torch.float64)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.W_Q, block.attn.W_K, block.attn.b_Q, block.attn.b_K):
                p.zero_()
    for block in model.blocks:
        block.mlp.act_fn = lambda x: x
    return model


# ----------------------------------------------------------------------------------------------
# The graph
# ----------------------------------------------------------------------------------------------


def test_graph_sizes_and_edge_rule():
    g = Graph(n_layers=3, n_heads=2)
    assert g.n_nodes == 2 + 3 * 3 and g.n_senders == 1 + 3 * 3 and g.n_receivers == 3 * 3 + 1
    # counted by the rule, independently: sender writes before receiver reads
    write = {"input": -1.0}
    read = {"logits": 100.0}
    for layer in range(3):
        for h in range(2):
            write[f"a{layer}.h{h}"], read[f"a{layer}.h{h}"] = 2 * layer + 0.5, 2 * layer
        write[f"m{layer}"], read[f"m{layer}"] = 2 * layer + 1.5, 2 * layer + 1
    expected = {f"{s}->{r}" for s in write for r in read if write[s] < read[r]}
    assert set(g.edge_names()) == expected and g.n_edges == len(expected)
    qkv = Graph(n_layers=3, n_heads=2, qkv_inputs=True)
    into_heads = sum(1 for e in expected if e.split("->")[1].startswith("a"))
    assert qkv.n_edges == g.n_edges + 2 * into_heads
    assert "a0.h1->a1.h0<k>" in qkv.edge_names() and "a1.h0->a1.h1" not in g.edge_names()
    parallel = Graph(n_layers=3, n_heads=2, parallel_attn_mlp=True)
    assert "a1.h0->m1" not in parallel.edge_names() and "a0.h0->m1" in parallel.edge_names()
    # edge numbers follow the dense mask, sender-major
    s, r = g.pairs().unbind(-1)
    assert g.mask[s, r].all() and int(g.mask.sum()) == g.n_edges
    assert g.edge_index("a0.h1->m0") == g.edge_names().index("a0.h1->m0")


def test_graph_from_models_gqa_and_default_model_sizes(default_model):
    tiny = models.load("tiny-llama")
    assert tiny.cfg.n_key_value_heads < tiny.cfg.n_heads
    g = Graph.from_model(tiny)
    assert (g.n_nodes, g.n_edges, Graph.from_model(tiny, qkv_inputs=True).n_edges) == (12, 54, 110)
    big = Graph.from_model(default_model)
    assert default_model.cfg.n_key_value_heads < default_model.cfg.n_heads
    assert (big.n_nodes, big.n_edges) == (302, 44371)
    assert Graph.from_model(default_model, qkv_inputs=True).n_edges == 123211
    assert "302 nodes" in big.summary()


# ----------------------------------------------------------------------------------------------
# Exact edge patching against hand-hooked runs
# ----------------------------------------------------------------------------------------------

EDGES = ["input->a0.h1", "a0.h2->a1.h3", "m0->a1.h0", "a0.h1->m0", "input->m1", "a1.h2->m1",
         "a1.h2->logits", "input->logits", "m1->logits", "m0->m1"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("qkv", [False, True])
def test_exact_edge_patching_equals_hand_hooked_runs(name, qkv):
    model = models.load(name)
    clean, corrupt, answer, wrong = pairs(model)
    fn = logit_diff_fn(answer, wrong)
    graph = Graph.from_model(model, qkv_inputs=qkv)
    edges = [e + (f"<{x}>" if qkv and e.split("->")[1].startswith("a") else "")
             for e, x in zip(EDGES, "qkvqkvqkvq")]
    for direction, (target, source) in {"denoise": (corrupt, clean), "noise": (clean, corrupt)}.items():
        exact = exact_edge_patching(model, clean, corrupt, LogitDiff(answer, wrong), graph,
                                    direction=direction, edges=edges, progress=False)
        deltas = hand_deltas(model, source, target)
        hand = f64([hand_patched_score(model, target, deltas, e, fn) for e in edges])
        assert exact.names() == edges  # in the order asked for
        got = f64([exact.score(e) for e in edges])
        assert hand.abs().max() > 1e-2
        torch.testing.assert_close(got, hand, atol=1e-5, rtol=0)


def test_exact_edge_patching_with_gemma_style_norms_and_gqa():
    """Normalised attention outputs: a head's output difference is the change of the layer's
    normalised attention output when that head alone is patched (measured by hand)."""
    model = post_norm_model()
    clean, corrupt, answer, wrong = pairs(model)
    graph = Graph.from_model(model, qkv_inputs=True)
    assert graph.attn_out_norm
    edges = ["a0.h1->a1.h2<k>", "a0.h3->m0", "a1.h0->logits", "a0.h2->a1.h0<v>", "m0->a1.h1<q>"]
    exact = exact_edge_patching(model, clean, corrupt, LogitDiff(answer, wrong), graph, edges=edges,
                                progress=False)
    deltas = hand_deltas(model, clean, corrupt, post_norm=True)
    fn = logit_diff_fn(answer, wrong)
    hand = f64([hand_patched_score(model, corrupt, deltas, e, fn) for e in edges])
    assert hand.abs().max() > 1e-2
    torch.testing.assert_close(f64([exact.score(e) for e in edges]),
                               hand, atol=1e-6, rtol=0)
    # EAP uses the same differences, with the gradient at the receivers
    e = eap(model, clean, corrupt, LogitDiff(answer, wrong), graph)
    grads = hand_grads(model, corrupt, fn)
    ref = f64([hand_eap_score(model, deltas, grads, x) for x in edges])
    torch.testing.assert_close(f64([e.score(x) for x in edges]), ref,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["attn_only", "parallel_attn_mlp"])
def test_attention_only_and_parallel_models(variant):
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=3, d_head=8, d_mlp=48, n_ctx=16,
                                  d_vocab=50, act_fn="gelu", normalization_type="LN", seed=4,
                                  dtype=torch.float64, **{variant: True})
    model = HookedTransformer(cfg).eval()
    clean, corrupt, answer, wrong = pairs(model)
    fn, metric = logit_diff_fn(answer, wrong), LogitDiff(answer, wrong)
    graph = Graph.from_model(model, qkv_inputs=True)
    assert graph.has_mlp == (variant != "attn_only")
    if variant == "parallel_attn_mlp":
        assert "a0.h1->m0" not in graph.edge_names() and "a0.h1->m1" in graph.edge_names()
    exact = exact_edge_patching(model, clean, corrupt, metric, graph, progress=False)
    scores = eap(model, clean, corrupt, metric, graph)
    deltas, grads = hand_deltas(model, clean, corrupt), hand_grads(model, corrupt, fn)
    names = graph.edge_names()
    hand = f64([hand_patched_score(model, corrupt, deltas, e, fn) for e in names])
    ref = f64([hand_eap_score(model, deltas, grads, e) for e in names])
    assert hand.abs().max() > 1e-2
    torch.testing.assert_close(exact.values.double(), hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.values.double(), ref, atol=1e-5, rtol=0)


def test_exact_edge_patching_selections(random_pairs):
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = random_pairs(model)
    graph = Graph.from_model(model)
    full = exact_edge_patching(model, clean, corrupt, metric, graph, progress=False)
    assert len(full) == graph.n_edges and full.method == "exact"
    into = exact_edge_patching(model, clean, corrupt, metric, graph, receivers=["m1", "logits"],
                               progress=False)
    assert {n.split("->")[1] for n in into.names()} == {"m1", "logits"}
    torch.testing.assert_close(into.values, full.sel(receiver=["m1", "logits"]).values)
    sample = exact_edge_patching(model, clean, corrupt, metric, graph, sample=7, seed=3, progress=False)
    again = exact_edge_patching(model, clean, corrupt, metric, graph, sample=7, seed=3, progress=False)
    assert len(sample) == 7 and torch.equal(sample.ids, again.ids)
    torch.testing.assert_close(sample.values, full.values[sample.ids])
    # many edges per pass give the numbers of one edge per pass
    tiny = exact_edge_patching(model, clean, corrupt, metric, graph, memory_gb=1e-9, progress=False)
    torch.testing.assert_close(tiny.values, full.values, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Gradient methods against plain autograd
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_eap_equals_plain_autograd_on_every_edge(name):
    model = models.load(name)
    clean, corrupt, answer, wrong = pairs(model)
    fn = logit_diff_fn(answer, wrong)
    for qkv in (False, True):
        graph = Graph.from_model(model, qkv_inputs=qkv)
        for direction, (target, source) in {"denoise": (corrupt, clean), "noise": (clean, corrupt)}.items():
            scores = eap(model, clean, corrupt, LogitDiff(answer, wrong), graph, direction=direction)
            deltas, grads = hand_deltas(model, source, target), hand_grads(model, target, fn)
            ref = f64([hand_eap_score(model, deltas, grads, e) for e in graph.edge_names()])
            assert ref.abs().max() > 1e-2
            torch.testing.assert_close(scores.values.double(), ref, atol=1e-5, rtol=0)
            assert scores.baseline == pytest.approx(fn(model(target)).mean().item(), abs=1e-6)


def test_eap_ig_inputs_and_activations_equal_plain_autograd():
    model = models.load("tiny-llama")
    clean, corrupt, answer, wrong = pairs(model)
    fn = logit_diff_fn(answer, wrong)
    graph = Graph.from_model(model, qkv_inputs=True)
    metric, steps = LogitDiff(answer, wrong), 3
    deltas = hand_deltas(model, clean, corrupt)
    alphas = [(k + 0.5) / steps for k in range(steps)]

    # inputs: the embeddings on the line from corrupt to clean (token embeddings; the
    # tiny Llama has rotary positions, so there are no position embeddings)
    with torch.no_grad():
        e_clean, e_corrupt = model.embed(clean), model.embed(corrupt)
    mean = None
    for a in alphas:
        hook = ("hook_embed", lambda act, hook, a=a: (e_corrupt + a * (e_clean - e_corrupt)).requires_grad_(True))
        g = hand_grads(model, corrupt, fn, interpolate=hook)
        mean = g if mean is None else {k: mean[k] + g[k] for k in g}
    mean = {k: v / steps for k, v in mean.items()}
    ref = f64([hand_eap_score(model, deltas, mean, e) for e in graph.edge_names()])
    got = eap_ig(model, clean, corrupt, metric, graph, steps=steps, path="inputs")
    torch.testing.assert_close(got.values.double(), ref, atol=1e-5, rtol=0)
    small = eap_ig(model, clean, corrupt, metric, graph, steps=steps, path="inputs", memory_gb=1e-9)
    torch.testing.assert_close(small.values, got.values, atol=1e-5, rtol=0)

    # activations: one sender's output (a head's hook_result, an MLP's output) on its own line
    act = eap_ig(model, clean, corrupt, metric, graph, steps=steps, path="activations")
    src, tgt = hand_outputs(model, clean), hand_outputs(model, corrupt)
    for sender, hook_name, head in [("a0.h2", "blocks.0.attn.hook_result", 2), ("m0", "blocks.0.hook_mlp_out", None),
                                    ("input", "blocks.0.hook_resid_pre", None)]:
        mean = None
        for a in alphas:
            def move(x, hook, a=a, sender=sender, head=head):
                x = x.clone()
                value = tgt[sender] + a * (src[sender] - tgt[sender])
                if head is None:
                    x[:] = value
                else:
                    x[:, :, head] = value
                return x
            g = hand_grads(model, corrupt, fn, interpolate=(hook_name, move))
            mean = g if mean is None else {k: mean[k] + g[k] for k in g}
        mean = {k: v / steps for k, v in mean.items()}
        mine = act.sel(sender=sender)
        ref = f64([hand_eap_score(model, deltas, mean, e) for e in mine.names()])
        assert ref.abs().max() > 1e-3, sender
        torch.testing.assert_close(mine.values.double(), ref, atol=1e-5, rtol=0, msg=sender)


def test_relp_edges_is_eap_with_relevance_gradients():
    model = models.load("tiny-llama")
    clean, corrupt, answer, wrong = pairs(model)
    metric, fn = LogitDiff(answer, wrong), logit_diff_fn(answer, wrong)
    graph = Graph.from_model(model)
    plain = eap(model, clean, corrupt, metric, graph)
    off = relp_edges(model, clean, corrupt, metric, graph, rules=LRPRules.off())
    torch.testing.assert_close(off.values, plain.values)
    relp = relp_edges(model, clean, corrupt, metric, graph)
    assert relp.method == "relp" and relp.baseline == pytest.approx(plain.baseline)
    assert not torch.allclose(relp.values, plain.values, atol=1e-4)  # the rules change the gradient
    with lrp_rules(model, LRPRules.relp()):
        grads = hand_grads(model, corrupt, fn)
    deltas = hand_deltas(model, clean, corrupt)
    ref = f64([hand_eap_score(model, deltas, grads, e) for e in graph.edge_names()])
    torch.testing.assert_close(relp.values.double(), ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Exactness on a linear model, and what sums hold
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_method_is_exact_on_a_linear_model(direction):
    model = linear_edge_model()
    clean, corrupt, answer, wrong = pairs(model, pos=5)
    metric = LogitDiff(answer, wrong)
    graph = Graph.from_model(model, qkv_inputs=True)
    exact = exact_edge_patching(model, clean, corrupt, metric, graph, direction=direction, progress=False)
    assert exact.values.abs().max() > 1e-2
    into_v_and_mlp = exact.sel(receiver=["a*<v>", "m*", "logits"]).values
    assert (into_v_and_mlp.abs() > 1e-3).float().mean() > 0.5  # not a comparison of zeros
    for scores in [eap(model, clean, corrupt, metric, graph, direction=direction),
                   eap_ig(model, clean, corrupt, metric, graph, direction=direction, steps=2),
                   eap_ig(model, clean, corrupt, metric, graph, direction=direction, steps=2,
                          path="activations"),
                   relp_edges(model, clean, corrupt, metric, graph, direction=direction)]:
        torch.testing.assert_close(scores.values, exact.values, atol=1e-5, rtol=0, msg=scores.method)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_edges_out_of_a_sender_sum_to_its_attribution_patching_score(name, random_pairs,
                                                                     plain_atp_reference):
    """The gradient at a write into the residual stream is the sum of the gradients of every
    input that reads it later, so EAP summed over a sender's edges is AtP of its output
    (heads at hook_z, MLPs at hook_mlp_out, the input at resid_pre 0), for either graph. (Exact
    edge patching does not sum to exact node patching: that holds only for linear models.)"""
    model = models.load(name)
    clean, corrupt, metric = random_pairs(model)
    atp = plain_atp_reference(model, clean, corrupt, metric, ["heads", "mlp", "resid"])
    for qkv in (False, True):
        graph = Graph.from_model(model, qkv_inputs=qkv)
        totals = eap(model, clean, corrupt, metric, graph).sender_totals().double()
        expect = [atp["resid"][0].sum()]
        for layer in range(model.cfg.n_layers):
            expect += list(atp["heads"][layer]) + [atp["mlp"][layer].sum()]
        torch.testing.assert_close(totals, torch.stack(expect).double(), atol=1e-5, rtol=0)


def test_default_model_edges_match_hand_hooked_runs(default_model):
    """SmolLM2 (GQA, RMSNorm, gated MLPs): a few sampled edges, exactly and by EAP."""
    model = default_model
    tokens = model.to_tokens(["When Mary and John went to the store, John gave a drink to"], prepend_bos=False)
    corrupt = model.to_tokens(["When Mary and John went to the store, Mary gave a drink to"], prepend_bos=False)
    answer, wrong = model.to_single_token(" Mary"), model.to_single_token(" John")
    metric, fn = LogitDiff(torch.tensor([answer]), torch.tensor([wrong])), logit_diff_fn([answer], [wrong])
    graph = Graph.from_model(model, qkv_inputs=True)
    edges = ["a9.h3->a20.h1<v>", "m3->m10", "a27.h5->logits", "input->a15.h0<q>", "m28->a29.h8<k>"]
    exact = exact_edge_patching(model, tokens, corrupt, metric, graph, edges=edges, progress=False)
    deltas = hand_deltas(model, tokens, corrupt)
    hand = f64([hand_patched_score(model, corrupt, deltas, e, fn) for e in edges])
    torch.testing.assert_close(f64([exact.score(e) for e in edges]), hand, atol=1e-3, rtol=0)
    assert hand.abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Any metric
# ----------------------------------------------------------------------------------------------


def test_any_metric_log_sum_exp_and_plain_functions():
    model = models.load("tiny-llama")
    clean, corrupt, answer, wrong = pairs(model)
    graph = Graph.from_model(model)
    pos, neg = [3, 17], [5, 9, 40]

    def lse_fn(logits):
        last = logits[:, -1]
        return last[:, pos].logsumexp(-1) - last[:, neg].logsumexp(-1)

    edges = ["input->a0.h1", "a0.h2->m1", "m0->logits", "a1.h3->m1"]
    lse = exact_edge_patching(model, clean, corrupt, LogSumExpDiff(pos, neg), graph, edges=edges,
                              progress=False)
    as_fn = exact_edge_patching(model, clean, corrupt, lse_fn, graph, edges=edges, progress=False)
    deltas = hand_deltas(model, clean, corrupt)
    hand = f64([hand_patched_score(model, corrupt, deltas, e, lse_fn) for e in edges])
    assert hand.abs().max() > 1e-2
    for scores in (lse, as_fn):
        torch.testing.assert_close(f64([scores.score(e) for e in edges]),
                                   hand, atol=1e-6, rtol=0)
    # gradient methods: the protocol metric and the same function give the same scores
    for method in (eap, lambda *a: eap_ig(*a, steps=2)):
        a = method(model, clean, corrupt, LogSumExpDiff(pos, neg), graph)
        b = method(model, clean, corrupt, CallableMetric(lse_fn), graph)
        assert a.values.abs().max() > 1e-2
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
    ref = f64([hand_eap_score(model, deltas, hand_grads(model, corrupt, lse_fn), e)
                        for e in graph.edge_names()])
    torch.testing.assert_close(eap(model, clean, corrupt, lse_fn, graph).values.double(), ref,
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# EdgeScores queries
# ----------------------------------------------------------------------------------------------


def test_edge_score_queries():
    g = Graph(n_layers=2, n_heads=2, qkv_inputs=True)
    values = torch.randn(g.n_edges, generator=torch.Generator().manual_seed(0))
    scores = EdgeScores(graph=g, ids=torch.arange(g.n_edges), values=values, method="x")
    dense = scores.dense()
    assert dense.shape == (g.n_senders, g.n_receivers)
    assert torch.equal(dense[g.mask], values) and (dense[~g.mask] == 0).all()
    order = sorted(range(g.n_edges), key=lambda i: -abs(values[i].item()))[:3]
    top = scores.top(3)
    assert [row["edge"] for row in top] == [g.edge_names()[i] for i in order]
    assert [row["value"] for row in top] == pytest.approx([values[i].item() for i in order])
    first = g.edge(order[0])
    assert (top[0]["sender"], top[0]["receiver"], top[0]["qkv"]) == (
        first.sender.name, first.receiver.node.name, first.receiver.qkv)
    assert scores.top(1, by="min")[0]["value"] == pytest.approx(values.min().item())
    frame = scores.to_frame()
    assert len(frame) == g.n_edges and list(frame["edge"]) == g.edge_names()
    sub = scores.sel(sender="a0.*", receiver="a1.h0")
    assert set(sub.names()) == {f"a0.h{h}->a1.h0<{x}>" for h in range(2) for x in "qkv"}
    assert sub.score("a0.h1->a1.h0<v>") == pytest.approx(scores.score(("a0.h1", "a1.h0<v>")))
    mask = scores.mask(top_n=4)
    assert int(mask.sum()) == 4 and mask[g.mask].sum() == 4
    assert torch.equal(scores.mask(threshold=0.99), (dense.abs() >= 0.99) & g.mask)
    assert scores.sender_totals().shape == (g.n_senders,)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_input_errors(random_pairs):
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = random_pairs(model)
    g = Graph.from_model(model)
    with pytest.raises(ValueError, match="unknown sender 'a9.h0'"):
        g.edge_index("a9.h0->logits")
    with pytest.raises(ValueError, match="no edge m1->a0.h0"):
        g.edge_index("m1->a0.h0")
    with pytest.raises(ValueError, match="no edge a0.h1->a0.h2"):
        g.edge_index("a0.h1->a0.h2")
    with pytest.raises(ValueError, match="qkv_inputs=False"):
        g.edge_index("input->a0.h0<q>")
    with pytest.raises(ValueError, match="input node sends"):
        g.edge_index("a0.h0->input")
    with pytest.raises(ValueError, match="logits receive"):
        g.edge_index("logits->m1")
    with pytest.raises(ValueError, match="'sender->receiver'"):
        g.edge_index("a0.h0")
    with pytest.raises(ValueError, match="names the q, k and v"):
        Graph.from_model(model, qkv_inputs=True).edge_index("input->a0.h0")
    with pytest.raises(ValueError, match="unknown receiver 'z3'"):
        exact_edge_patching(model, clean, corrupt, metric, g, receivers=["z3"], progress=False)
    with pytest.raises(ValueError, match="sample must be"):
        exact_edge_patching(model, clean, corrupt, metric, g, sample=10_000, progress=False)
    with pytest.raises(ValueError, match="either `edges` or `receivers`"):
        exact_edge_patching(model, clean, corrupt, metric, g, edges=["m0->m1"], receivers="m1")
    other = Graph.from_model(models.load("tiny-llama"))
    assert other.n_edges == g.n_edges  # same shape: accepted
    with pytest.raises(ValueError, match="Graph.from_model"):
        eap(model, clean, corrupt, metric, Graph(n_layers=3, n_heads=4))
    with pytest.raises(ValueError, match="steps must be"):
        eap_ig(model, clean, corrupt, metric, g, steps=0)
    scores = eap(model, clean, corrupt, metric, g)
    with pytest.raises(ValueError, match="by must be"):
        scores.top(3, by="size")
    with pytest.raises(ValueError, match="exactly one of top_n and threshold"):
        scores.mask()
    part = scores.sel(receiver="logits")
    with pytest.raises(ValueError, match="was not scored"):
        part.score("m0->m1")


@pytest.mark.unchecked
def test_bad_options_errors(random_pairs):
    """Wrongly typed options on purpose: interp's own messages (what a user sees)."""
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = random_pairs(model)
    with pytest.raises(ValueError, match="path must be"):
        eap_ig(model, clean, corrupt, metric, path="outputs")
    with pytest.raises(ValueError, match="direction must be"):
        eap(model, clean, corrupt, metric, direction="up")
    with pytest.raises(ValueError, match="graph must be a Graph"):
        eap(model, clean, corrupt, metric, graph="all")
    with pytest.raises(ValueError, match="an edge is a name"):
        Graph.from_model(model).edge_index(3.5)


# ----------------------------------------------------------------------------------------------
# Exact edge patching skips the shared prefix
# ----------------------------------------------------------------------------------------------


def prefix_pairs(model, batch=3, pos=7, shared=3, seed=5):
    """Clean and corrupt prompts that agree on their first `shared` positions in every row."""
    clean, corrupt, answer, wrong = pairs(model, batch=batch, pos=pos, seed=seed)
    corrupt[:, :shared] = clean[:, :shared]
    corrupt[:, shared] = (clean[:, shared] + 1) % model.cfg.d_vocab
    return clean, corrupt, answer, wrong


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "post-norm"])
def test_exact_edge_patching_after_a_shared_prefix_equals_hand_hooked_runs(name):
    """Rows that agree up to position 3 start the patched runs there (the target's keys and
    values before it from a KV cache, per query head in the patched block of a GQA model):
    every edge still equals the hand-hooked full run, also for a prompt whose prediction
    position lies inside the shared prefix and for a plain function of every position."""
    model = post_norm_model() if name == "post-norm" else models.load(name)
    clean, corrupt, answer, wrong = prefix_pairs(model)
    graph = Graph.from_model(model, qkv_inputs=True)
    names = graph.edge_names()
    deltas = hand_deltas(model, clean, corrupt, post_norm=name == "post-norm")
    end = torch.tensor([6, 1, 5])  # row 1 predicts inside the shared prefix: no edge moves it
    metric = LogitDiff(answer, wrong, end_pos=end)

    def fn(logits):
        rows = torch.arange(logits.shape[0])
        return logits[rows, end, answer] - logits[rows, end, wrong]

    def all_positions(logits):  # reads every position: the slow path
        return logits.log_softmax(-1)[:, :, answer[0]].mean(-1)

    for m, f in [(metric, fn), (all_positions, all_positions)]:
        exact = exact_edge_patching(model, clean, corrupt, m, graph, progress=False)
        hand = f64([hand_patched_score(model, corrupt, deltas, e, f) for e in names])
        assert hand.abs().max() > 1e-3
        torch.testing.assert_close(exact.values.double(), hand, atol=1e-5, rtol=0)
    # and the prompt that ends in the prefix contributes nothing
    one = exact_edge_patching(model, clean[1:2], corrupt[1:2], LogitDiff(answer[1:2], wrong[1:2], end_pos=end[1:2]),
                              graph, receivers="logits", progress=False)
    assert one.values.abs().max() == 0
    # the patched runs (more rows than the batch) ran positions 3.. only
    seen = []
    with model.hooks(fwd_hooks=[(f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre",
                                 lambda act, hook: seen.append(tuple(act.shape[:2])))]):
        exact_edge_patching(model, clean, corrupt, metric, graph, receivers="a1.*", progress=False)
    assert {p for rows, p in seen if rows > 3} == {4} and (3, 7) in seen


def test_eap_ig_inputs_is_a_path_integral_of_the_whole_segment():
    """EAP-IG (inputs) integrates along the whole segment between the two inputs, so it does
    not depend on which end is the target: the noise scores are minus the denoise ones (the
    midpoint rule is symmetric), and many steps of hannamw/EAP-IG's left Riemann sum
    (`alpha = k / steps`, k = 0..steps-1, from the corrupt input) reach the same integral. EAP
    at the two ends differs (it is the gradient at one end)."""
    model = models.load("tiny-llama")
    clean, corrupt, answer, wrong = pairs(model)
    metric, fn = LogitDiff(answer, wrong), logit_diff_fn(answer, wrong)
    graph = Graph.from_model(model)
    denoise = eap_ig(model, clean, corrupt, metric, graph, steps=4)
    noise = eap_ig(model, clean, corrupt, metric, graph, steps=4, direction="noise")
    torch.testing.assert_close(noise.values, -denoise.values, atol=1e-5, rtol=0)
    ends = (eap(model, clean, corrupt, metric, graph).values,
            -eap(model, clean, corrupt, metric, graph, direction="noise").values)
    assert not torch.allclose(*ends, atol=1e-3)
    with torch.no_grad():
        e_clean, e_corrupt = model.embed(clean), model.embed(corrupt)

    def grads_at(a):
        hook = ("hook_embed", lambda act, hook: (e_corrupt + a * (e_clean - e_corrupt)).requires_grad_(True))
        return hand_grads(model, corrupt, fn, interpolate=hook)

    steps, total = 64, None
    for k in range(steps):
        g = grads_at(k / steps)
        total = g if total is None else {n: total[n] + g[n] for n in g}
    # left sum plus the end correction (g(1) - g(0)) / 2: the trapezoid rule, error O(1/steps^2)
    first, last = grads_at(0.0), grads_at(1.0)
    trapezoid = {n: (total[n] + (last[n] - first[n]) / 2) / steps for n in total}
    deltas = hand_deltas(model, clean, corrupt)
    ref = f64([hand_eap_score(model, deltas, trapezoid, e) for e in graph.edge_names()])
    fine = eap_ig(model, clean, corrupt, metric, graph, steps=64)
    torch.testing.assert_close(fine.values.double(), ref, atol=1e-3 * ref.abs().max().item(), rtol=0)
