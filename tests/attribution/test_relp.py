"""RelP = AtP under LRP rules."""

from __future__ import annotations

import torch

from interp import models
from interp.attribution.atp import attribution_patching
from interp.attribution.lrp import LRPRules
from interp.attribution.patching import exact_patching
from interp.attribution.relp import relp

FAMS = ["resid", "attn", "mlp", "heads"]


def test_relp_with_all_rules_off_is_atp(random_pairs):
    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    atp = attribution_patching(model, clean, corrupt, metric, FAMS)
    off = relp(model, clean, corrupt, metric, FAMS, rules=LRPRules.off())
    for fam in FAMS:
        assert torch.equal(atp[fam].values, off[fam].values), fam


def test_relp_changes_the_scores_and_leaves_the_model_clean(random_pairs):
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = random_pairs(model)
    atp = attribution_patching(model, clean, corrupt, metric, FAMS)
    rel = relp(model, clean, corrupt, metric, FAMS)
    assert rel["mlp"].method == "relp"
    assert not torch.allclose(atp["mlp"].values, rel["mlp"].values)
    assert atp["mlp"].baseline == rel["mlp"].baseline  # same forward pass
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    after = attribution_patching(model, clean, corrupt, metric, FAMS)
    assert torch.equal(after["mlp"].values, atp["mlp"].values)


def test_relp_on_a_linear_model_is_exact(linear_model, random_pairs):
    """Without norms and non-linearities the rules have nothing to change: RelP = exact."""
    clean, corrupt, metric = random_pairs(linear_model)
    fams = ["resid", "attn", "heads"]
    rel = relp(linear_model, clean, corrupt, metric, fams)
    exact = exact_patching(linear_model, clean, corrupt, metric, fams, progress=False)
    for fam in fams:
        assert torch.allclose(rel[fam].values, exact[fam].values, atol=1e-4), fam
