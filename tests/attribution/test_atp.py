"""Attribution patching: exact on a linear model, close to exact patching on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp import models
from interp.attribution.atp import attribution_patching
from interp.attribution.metrics import LogitDiff
from interp.attribution.patching import exact_patching

FAMILIES = ["resid", "attn", "mlp", "heads", "heads_by_pos", "neurons"]


def _linear_model() -> HookedTransformer:
    """No normalisation; W_Q = W_K = 0 so every attention pattern is the fixed uniform causal
    one; W_in = b_in = 0 so each MLP writes a constant. The logits are then affine in every
    activation, and a first-order estimate must be exact."""
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16,
                                  d_vocab=50, act_fn="gelu", normalization_type=None, seed=1)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.W_Q, block.attn.W_K, block.attn.b_Q, block.attn.b_K,
                      block.mlp.W_in, block.mlp.b_in):
                p.zero_()
    return model.eval()


def _pairs(model, batch=3, pos=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupt = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    answer = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    wrong = (answer + 1) % model.cfg.d_vocab
    return clean, corrupt, LogitDiff(answer, wrong).normalised(model, clean, corrupt)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_equals_exact_patching_on_a_linear_model(direction):
    model = _linear_model()
    clean, corrupt, metric = _pairs(model)
    fams = ["resid", "attn", "heads", "heads_by_pos"]
    exact = exact_patching(model, clean, corrupt, metric, fams, direction=direction, progress=False)
    atp = attribution_patching(model, clean, corrupt, metric, fams, direction=direction)
    for fam in fams:
        assert atp[fam].values.shape == exact[fam].values.shape
        assert exact[fam].values.abs().max() > 1e-2, fam  # not a comparison of zeros
        assert torch.allclose(atp[fam].values, exact[fam].values, atol=1e-4), fam
        assert atp[fam].baseline == pytest.approx(exact[fam].baseline, abs=1e-5)


def test_atp_is_not_exact_on_a_nonlinear_model_but_tracks_it():
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = _pairs(model, batch=4, pos=8)
    exact = exact_patching(model, clean, corrupt, metric, ["resid", "heads"], progress=False)
    atp = attribution_patching(model, clean, corrupt, metric, ["resid", "heads"])
    r = torch.corrcoef(torch.stack([atp["resid"].flat(), exact["resid"].flat()]))[0, 1]
    assert r > 0.5
    assert not torch.allclose(atp["resid"].values, exact["resid"].values, atol=1e-4)


def test_every_family_has_the_shape_of_its_axes():
    model = models.load("tiny-llama")
    clean, corrupt, metric = _pairs(model)
    atp = attribution_patching(model, clean, corrupt, metric, FAMILIES)
    cfg = model.cfg
    expected = {"resid": (2, 6), "attn": (2, 6), "mlp": (2, 6), "heads": (2, cfg.n_heads),
                "heads_by_pos": (2, 6, cfg.n_heads), "neurons": (2, cfg.d_mlp)}
    for fam, shape in expected.items():
        assert tuple(atp[fam].values.shape) == shape, fam
        assert atp[fam].dims[0] == "layer"
    # heads summed over positions equal heads by position summed over positions
    assert torch.allclose(atp["heads"].values, atp["heads_by_pos"].values.sum(1), atol=1e-5)


def test_atp_leaves_parameters_and_hooks_as_they_were():
    model = models.load("tiny-gpt2")
    for p in model.parameters():
        p.requires_grad_(False)
    clean, corrupt, metric = _pairs(model)
    attribution_patching(model, clean, corrupt, metric, ["resid"])
    assert not any(p.requires_grad for p in model.parameters())
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
