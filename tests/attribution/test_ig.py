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


def test_ig_equals_atp_and_exact_patching_on_a_linear_model(linear_model, random_pairs):
    """Where the logits are affine in the embeddings every alpha gives the same gradient."""
    from interp.attribution.patching import exact_patching

    clean, corrupt, metric = random_pairs(linear_model)
    fams = ["resid", "attn", "heads"]
    ig = integrated_gradients(linear_model, clean, corrupt, metric, fams, steps=3)
    atp = attribution_patching(linear_model, clean, corrupt, metric, fams)
    exact = exact_patching(linear_model, clean, corrupt, metric, fams, progress=False)
    for fam in fams:
        assert torch.allclose(ig[fam].values, atp[fam].values, atol=1e-4), fam
        assert torch.allclose(ig[fam].values, exact[fam].values, atol=1e-4), fam


def test_bad_steps(random_pairs):
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = random_pairs(model)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        integrated_gradients(model, clean, corrupt, metric, steps=0)
