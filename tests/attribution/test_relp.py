"""RelP = AtP under LRP rules."""

from __future__ import annotations

import pytest
import torch

from interp import models
from interp.attribution.atp import attribution_patching
from interp.attribution.lrp import LRPRules, lrp_rules
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


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_relp_equals_rule_gradients_times_deltas_from_a_plain_capture(name, random_pairs,
                                                                       plain_atp_reference):
    """RelP with the paper's rules = (a_source - a_target) . relevance gradient, the gradient
    taken by autograd through `lrp_rules` with plain TransformerLens capture hooks. tiny-llama
    has RMSNorm and a gated SiLU MLP (LN, identity and half rules), tiny-gpt2 LayerNorm and GELU.
    Float64 weights; the scores are float32, so the tolerance is 1e-6 plus 1e-6 relative."""
    model = models.load(name, dtype=torch.float64)
    clean, corrupt, metric = random_pairs(model)
    fams = [*FAMS, "neurons"]
    rel = relp(model, clean, corrupt, metric, fams)
    with lrp_rules(model, LRPRules.relp()):
        reference = plain_atp_reference(model, clean, corrupt, metric, fams)
    plain = plain_atp_reference(model, clean, corrupt, metric, fams)
    for fam in fams:
        assert reference[fam].abs().max() > 1e-2, fam
        torch.testing.assert_close(rel[fam].values, reference[fam].float(), atol=1e-6, rtol=1e-6,
                                   msg=lambda m, fam=fam: f"{fam}: {m}")
    # the rules changed the gradient (else this would only repeat the AtP comparison)
    assert (reference["mlp"] - plain["mlp"]).abs().max() > 1e-3


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
