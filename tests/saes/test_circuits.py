"""SAE latents as sites of the circuit engine, and faithfulness of sparse feature circuits."""

from __future__ import annotations

import pytest
import torch

from interp.attribution.atp import attribution_patching
from interp.attribution.ig import integrated_gradients
from interp.attribution.patching import exact_patching
from interp.attribution.relp import relp
from interp.saes import attach
from interp.saes.circuits import (
    ablation_means,
    circuit_metric,
    faithfulness_curve,
    latent_families,
    top_nodes,
)

HOOKS = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out")


@pytest.fixture
def attach_random(make_topk_sae):
    """`attach_random(model, hooks=HOOKS)`: random TopK SAEs (2 x d_model latents, k = 6, a
    seed per hook) attached at `hooks`, as a context manager."""

    def attach_to(model, hooks=HOOKS):
        d = model.cfg.d_model
        return attach(model, {h: make_topk_sae(d, 2 * d, k=6, hook_name=h, seed=i)
                              for i, h in enumerate(hooks)}, skip_first=0)

    return attach_to


def test_latent_families_group_saes_by_kind_of_hook(linear_model, attach_random):
    with attach_random(linear_model):
        fams = {f.name: f for f in latent_families(linear_model)}
        assert set(fams) == {"latents_resid_pre", "errors_resid_pre", "latents_attn_out",
                             "errors_attn_out"}
        assert fams["latents_resid_pre"].layers == (0, 1)
        assert fams["latents_attn_out"].hook_name(1) == "blocks.1.hook_attn_out.hook_sae_acts_post"
        assert fams["errors_attn_out"].hook_name(1) == "blocks.1.hook_attn_out.hook_sae_error"
        with pytest.raises(ValueError, match="no SAE is attached at"):
            latent_families(linear_model, ["blocks.2.hook_resid_pre"])
    with pytest.raises(ValueError, match="no SAEs are attached"):
        latent_families(linear_model)


def test_attribution_over_latents_equals_exact_ablation_where_linear(linear_model, random_pairs,
                                                                    attach_random):
    """Past the SAE encoders the linear model is affine in the latents and error nodes, so AtP,
    IG (both paths) and RelP over them equal exact patching, latent by latent."""
    clean, corrupt, metric = random_pairs(linear_model)
    with attach_random(linear_model):
        fams = latent_families(linear_model)
        exact = exact_patching(linear_model, clean, corrupt, metric, fams, progress=False)
        methods = {
            "atp": attribution_patching(linear_model, clean, corrupt, metric, fams),
            "ig_inputs": integrated_gradients(linear_model, clean, corrupt, metric, fams, steps=2),
            "ig_acts": integrated_gradients(linear_model, clean, corrupt, metric, fams, steps=2,
                                            path="activations"),
            "relp": relp(linear_model, clean, corrupt, metric, fams),
        }
    for fam in fams:
        ex = exact[fam.name].values
        assert ex.grad_fn is None  # plain numbers, even though the SAE's weights require grad
        assert ex.shape[1:] == ((clean.shape[1], 2 * 32) if "latents" in fam.name else (clean.shape[1],))
        assert ex.abs().max() > 1e-3, fam.name  # the latents do carry the metric
        for name, scores in methods.items():
            torch.testing.assert_close(scores[fam.name].values, ex, atol=2e-4, rtol=1e-3,
                                       msg=f"{name} on {fam.name}")


def test_exact_latent_patching_is_not_linear_on_a_real_model(random_pairs, attach_random):
    """The same comparison on tiny-llama (norms, gated MLPs) must show a gap, or the test above
    could not tell AtP from exact patching."""
    from interp import models

    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    with attach_random(model, ("blocks.1.hook_resid_pre",)):
        fams = latent_families(model, error=False)
        exact = exact_patching(model, clean, corrupt, metric, fams, progress=False)
        atp = attribution_patching(model, clean, corrupt, metric, fams)
    gap = (exact["latents_resid_pre"].values - atp["latents_resid_pre"].values).abs().max()
    assert gap > 1e-3


def test_top_nodes_ranks_all_families_together():
    from interp.attribution.sites import Scores

    a = Scores("a", "m", torch.tensor([[[0.1, -3.0], [0.0, 0.2]]]), ("layer", "pos", "latent"))
    b = Scores("b", "m", torch.tensor([[2.0, -0.15]]), ("layer", "pos"))
    masks = top_nodes({"a": a, "b": b}, 3)
    assert masks["a"].tolist() == [[[False, True], [False, True]]]
    assert masks["b"].tolist() == [[True, False]]
    assert sum(m.sum() for m in top_nodes({"a": a, "b": b}, 0).values()) == 0
    assert sum(m.sum() for m in top_nodes({"a": a, "b": b}, 99).values()) == 6


def test_faithfulness_is_additive_on_a_linear_model(linear_model, random_pairs, attach_random):
    """With one SAE the model is affine in its nodes: m(C) - m(empty) is the sum of the kept
    nodes' contributions, so disjoint circuits add up, the full circuit gives 1 and the empty
    one 0. (With SAEs at several layers it is not: a kept latent downstream is recomputed by
    its encoder from an input that upstream ablations changed.)"""
    clean, corrupt, metric = random_pairs(linear_model)
    with attach_random(linear_model, ("blocks.1.hook_resid_pre",)):
        fams = latent_families(linear_model)
        means = ablation_means(linear_model, torch.cat([clean, corrupt]), fams)
        atp = attribution_patching(linear_model, clean, corrupt, metric, fams, direction="noise")
        empty = circuit_metric(linear_model, clean, metric, fams, {}, means)
        full = {f.name: torch.ones_like(atp[f.name].values, dtype=torch.bool) for f in fams}
        assert circuit_metric(linear_model, clean, metric, fams, full, means) == pytest.approx(
            metric.on_model(linear_model, clean).mean().item(), abs=1e-5)
        gen = torch.Generator().manual_seed(0)
        split = {n: torch.rand(m.shape, generator=gen) < 0.5 for n, m in full.items()}
        rest = {n: ~m for n, m in split.items()}
        one = circuit_metric(linear_model, clean, metric, fams, split, means) - empty
        other = circuit_metric(linear_model, clean, metric, fams, rest, means) - empty
        whole = circuit_metric(linear_model, clean, metric, fams, full, means) - empty
        assert abs(whole) > 1e-2
        assert one + other == pytest.approx(whole, abs=1e-4)
        curve = faithfulness_curve(linear_model, clean, metric, atp, fams, [0, 5, 10_000], means)
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-6)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    assert curve.n_nodes == sum(a.values.numel() for a in atp.values())


def test_faithfulness_keeps_the_model_when_nothing_is_ablated(random_pairs, attach_random):
    """On tiny-llama (not linear): keeping every node reproduces the model's own metric through
    the error terms, and mean-ablating every node changes it."""
    from interp import models

    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    with attach_random(model, ("blocks.1.hook_resid_pre",)):
        fams = latent_families(model)
        means = ablation_means(model, torch.cat([clean, corrupt]), fams)
        scores = attribution_patching(model, clean, corrupt, metric, fams, direction="noise")
        curve = faithfulness_curve(model, clean, metric, scores, fams, [10_000], means)
    with torch.no_grad():
        plain = metric.on_model(model, clean).mean().item()
    assert curve.m_full == pytest.approx(plain, abs=1e-6)
    assert curve.metric[0] == pytest.approx(plain, abs=1e-4)
    assert abs(curve.m_empty - plain) > 1e-2
    with pytest.raises(ValueError, match="scores lack the families"):
        faithfulness_curve(model, clean, metric, {}, fams, [1], means)
