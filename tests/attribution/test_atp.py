"""Attribution patching: exact on a linear model, close to exact patching on tiny models."""

from __future__ import annotations

import pytest
import torch

from interp import models
from interp.attribution.atp import attribution_patching
from interp.attribution.patching import exact_patching

FAMILIES = ["resid", "attn", "mlp", "heads", "heads_by_pos", "neurons"]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_equals_exact_patching_on_a_linear_model(direction, linear_model, random_pairs):
    model = linear_model
    clean, corrupt, metric = random_pairs(model)
    fams = ["resid", "attn", "heads", "heads_by_pos"]
    exact = exact_patching(model, clean, corrupt, metric, fams, direction=direction, progress=False)
    atp = attribution_patching(model, clean, corrupt, metric, fams, direction=direction)
    for fam in fams:
        assert atp[fam].values.shape == exact[fam].values.shape
        assert exact[fam].values.abs().max() > 1e-2, fam  # not a comparison of zeros
        assert torch.allclose(atp[fam].values, exact[fam].values, atol=1e-4), fam
        assert atp[fam].baseline == pytest.approx(exact[fam].baseline, abs=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_equals_a_plain_autograd_reference_on_tiny_models(name, direction, random_pairs,
                                                               plain_atp_reference):
    """On non-linear models the gradient differs from run to run, so this catches a gradient
    taken on the source run (or at the wrong hook point) that the linear model cannot. Float64
    weights: what is left is the rounding of the float32 scores (values up to ~10 here)."""
    model = models.load(name, dtype=torch.float64)
    clean, corrupt, metric = random_pairs(model)
    atp = attribution_patching(model, clean, corrupt, metric, FAMILIES, direction=direction)
    reference = plain_atp_reference(model, clean, corrupt, metric, FAMILIES, direction)
    for fam in FAMILIES:
        assert reference[fam].abs().max() > 1e-2, fam  # not a comparison of zeros
        torch.testing.assert_close(atp[fam].values, reference[fam].float(), atol=1e-5, rtol=0,
                                   msg=lambda m, fam=fam: f"{fam}: {m}")


def test_atp_is_not_exact_on_a_nonlinear_model_but_tracks_it(random_pairs):
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = random_pairs(model, batch=4, pos=8)
    exact = exact_patching(model, clean, corrupt, metric, ["resid", "heads"], progress=False)
    atp = attribution_patching(model, clean, corrupt, metric, ["resid", "heads"])
    r = torch.corrcoef(torch.stack([atp["resid"].flat(), exact["resid"].flat()]))[0, 1]
    assert r > 0.5
    assert not torch.allclose(atp["resid"].values, exact["resid"].values, atol=1e-4)


def test_every_family_has_the_shape_of_its_axes(random_pairs):
    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    atp = attribution_patching(model, clean, corrupt, metric, FAMILIES)
    cfg = model.cfg
    expected = {"resid": (2, 6), "attn": (2, 6), "mlp": (2, 6), "heads": (2, cfg.n_heads),
                "heads_by_pos": (2, 6, cfg.n_heads), "neurons": (2, cfg.d_mlp)}
    for fam, shape in expected.items():
        assert tuple(atp[fam].values.shape) == shape, fam
        assert atp[fam].dims[0] == "layer"
    # heads summed over positions equal heads by position summed over positions
    assert torch.allclose(atp["heads"].values, atp["heads_by_pos"].values.sum(1), atol=1e-5)


def test_atp_leaves_parameters_and_hooks_as_they_were(random_pairs):
    model = models.load("tiny-gpt2")
    for p in model.parameters():
        p.requires_grad_(False)
    clean, corrupt, metric = random_pairs(model)
    attribution_patching(model, clean, corrupt, metric, ["resid"])
    assert not any(p.requires_grad for p in model.parameters())
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_custom_site_family_on_some_layers(linear_model, random_pairs):
    """A `SiteFamily` given as an object (here the values `v` by position, at layers 0 and 2
    only) goes through every method: exact and AtP agree on the linear model, with one row per
    listed layer and site axes sized from the activation."""
    from interp.attribution.atp_star import atp_star
    from interp.attribution.sites import SiteFamily

    model = linear_model
    clean, corrupt, metric = random_pairs(model)
    values = SiteFamily("v_by_pos", "blocks.{L}.attn.hook_v", ("pos",),
                        ("batch", "pos", "head", "d_head"), layers=(0, 2))
    exact = exact_patching(model, clean, corrupt, metric, [values], progress=False)["v_by_pos"]
    atp = attribution_patching(model, clean, corrupt, metric, [values])["v_by_pos"]
    star = atp_star(model, clean, corrupt, metric, [values])["v_by_pos"]
    assert exact.values.shape == (2, clean.shape[1]) and exact.labels["layer"] == ["0", "2"]
    assert exact.site_labels()[-1] == f"L2 pos{clean.shape[1] - 1}"
    assert exact.values.abs().max() > 1e-2
    torch.testing.assert_close(atp.values, exact.values, atol=1e-4, rtol=0)
    torch.testing.assert_close(star.values, atp.values)
    # the same sites as part of a family over all layers
    full = exact_patching(model, clean, corrupt, metric,
                          [SiteFamily("v_all", "blocks.{L}.attn.hook_v", ("pos",),
                                      ("batch", "pos", "head", "d_head"))], progress=False)["v_all"]
    torch.testing.assert_close(full.values[[0, 2]], exact.values)
