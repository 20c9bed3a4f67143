"""Integrated gradients: completeness at the interpolated layer, equality with AtP where linear."""

from __future__ import annotations

import pytest
import torch

from interp import models
from interp.attribution.atp import attribution_patching
from interp.attribution.ig import integrated_gradients


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_completeness_at_layer_0(name, random_pairs):
    """Summed over positions, IG of resid_pre at layer 0 (the interpolated embeddings) approaches
    metric(clean) - metric(corrupt) = 1 - 0 for the normalised metric."""
    model = models.load(name)
    clean, corrupt, metric = random_pairs(model)
    ig = integrated_gradients(model, clean, corrupt, metric, ["resid"], steps=64)
    total = ig["resid"].values[0].sum().item()
    assert total == pytest.approx(1.0, abs=0.02)
    atp = attribution_patching(model, clean, corrupt, metric, ["resid"])
    # AtP (a single gradient) is further from completeness than IG on a non-linear model
    assert abs(atp["resid"].values[0].sum().item() - 1.0) > abs(total - 1.0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_completeness_error_shrinks_with_more_steps(name, random_pairs):
    """The midpoint rule converges: the error of the summed layer-0 scores against the exact
    metric difference (two plain forward passes, the normalised logit difference computed by
    hand) is smaller with 64 steps than with 8."""
    model = models.load(name)
    clean, corrupt, metric = random_pairs(model)
    rows = torch.arange(clean.shape[0])
    with torch.no_grad():
        ends = [model(t)[:, -1] for t in (clean, corrupt)]
    diffs = [e[rows, metric.answer_ids] - e[rows, metric.wrong_ids] for e in ends]
    exact = ((diffs[0] - diffs[1]).mean() / (metric.clean - metric.corrupt)).item()
    errors = {}
    for steps in (8, 64):
        ig = integrated_gradients(model, clean, corrupt, metric, ["resid"], steps=steps)
        errors[steps] = abs(ig["resid"].values[0].sum().item() - exact)
    assert errors[8] > 1e-4  # far above rounding: the comparison is not between two noises
    # the midpoint rule's error falls as 1/steps^2 for a smooth integrand (64x here); ask for 4x
    assert errors[64] < errors[8] / 4, errors


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out",
                                  "blocks.1.attn.hook_z"])
def test_activation_path_completeness_per_hook_point(name, hook, random_pairs):
    """With `path="activations"` the scores of one hook point sum to the effect of patching the
    whole hook point (all positions) from clean into corrupt, measured directly."""
    from interp.attribution.sites import SiteFamily

    model = models.load(name)
    clean, corrupt, metric = random_pairs(model)
    layer = int(hook.split(".")[1])
    template = hook.replace(f"blocks.{layer}.", "blocks.{L}.")
    axes = ("batch", "pos", "head", "d_head") if hook.endswith("hook_z") else ("batch", "pos", "d")
    fam = SiteFamily("x", template, ("pos",), axes, layers=(layer,))
    ig = integrated_gradients(model, clean, corrupt, metric, [fam], steps=48, path="activations")
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=hook)
        patched = model.run_with_hooks(corrupt, fwd_hooks=[(hook, lambda a, hook: cache[hook.name])])
        effect = (metric(patched).mean() - metric(model(corrupt)).mean()).item()
    total = ig["x"].values.sum().item()
    assert abs(effect) > 0.05  # a real effect, not a trivially zero one
    assert total == pytest.approx(effect, abs=0.02 * max(1.0, abs(effect)))


@pytest.mark.parametrize("path", ["inputs", "activations"])
def test_ig_equals_atp_and_exact_patching_on_a_linear_model(linear_model, random_pairs, path):
    """Where the logits are affine in the activations every alpha gives the same gradient."""
    from interp.attribution.patching import exact_patching

    clean, corrupt, metric = random_pairs(linear_model)
    fams = ["resid", "attn", "heads"]
    ig = integrated_gradients(linear_model, clean, corrupt, metric, fams, steps=3, path=path)
    atp = attribution_patching(linear_model, clean, corrupt, metric, fams)
    exact = exact_patching(linear_model, clean, corrupt, metric, fams, progress=False)
    for fam in fams:
        assert torch.allclose(ig[fam].values, atp[fam].values, atol=1e-4), fam
        assert torch.allclose(ig[fam].values, exact[fam].values, atol=1e-4), fam


@pytest.mark.unchecked
def test_bad_steps(random_pairs):
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = random_pairs(model)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        integrated_gradients(model, clean, corrupt, metric, steps=0)
    with pytest.raises(ValueError, match="path must be 'inputs' or 'activations'"):
        integrated_gradients(model, clean, corrupt, metric, path="weights")
