"""evaluate(): checked against planted SAEs whose quality is known in advance."""

from __future__ import annotations

import pytest
import torch

from interp.saes import evaluate

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture
def tokens():
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))


def test_a_perfect_sae_explains_everything_and_recovers_all_loss(tiny, tokens, make_identity_sae):
    d, n_dead = tiny.cfg.d_model, 16
    sae = make_identity_sae(d, n_dead=n_dead)
    q = evaluate(tiny, sae, HOOK, tokens, batch_size=4, skip_first=1)
    # independent statistics from the raw activations
    _, cache = tiny.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, d)
    pos_rate, neg_rate = (x > 0).float().mean(0), (x < 0).float().mean(0)
    rates = torch.cat([pos_rate, neg_rate, torch.zeros(n_dead)])
    assert q.n_tokens == x.shape[0] == 6 * 15 and q.d_sae == 2 * d + n_dead
    assert q.fve == pytest.approx(1.0, abs=1e-6) and q.relative_error < 1e-6
    assert q.median_relative_error < 1e-6 and q.fve_typical == pytest.approx(1.0, abs=1e-6)
    assert q.l0 == pytest.approx((x != 0).float().sum(-1).mean().item())
    assert q.dead_fraction == pytest.approx((rates == 0).float().mean().item())
    assert q.dense_fraction == pytest.approx((rates > 0.1).float().mean().item())
    assert q.ce_sae == pytest.approx(q.ce_clean, abs=1e-5)
    assert q.ce_loss_recovered == pytest.approx(1.0, abs=1e-3)
    # CE clean is the model's own loss over the evaluated predictions
    own = tiny(tokens, return_type="loss", loss_per_token=True)[:, 1:].mean().item()
    assert q.ce_clean == pytest.approx(own, rel=1e-5)


def test_an_sae_that_outputs_zero_recovers_nothing(tiny, tokens, make_identity_sae):
    sae = make_identity_sae(tiny.cfg.d_model)
    with torch.no_grad():
        sae.W_dec.zero_()
    q = evaluate(tiny, sae, HOOK, tokens, skip_first=0)
    assert q.ce_sae == pytest.approx(q.ce_zero, abs=1e-5)
    assert q.ce_loss_recovered == pytest.approx(0.0, abs=1e-4)
    _, cache = tiny.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK].reshape(-1, tiny.cfg.d_model).double()
    expected_fve = 1 - x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert q.fve == pytest.approx(expected_fve.item(), rel=1e-6)
    assert q.relative_error == pytest.approx(1.0) and q.median_relative_error == pytest.approx(1.0)


def test_fve_typical_leaves_out_a_planted_outlier_token(tiny, tokens, make_identity_sae):
    """An SAE that reconstructs only one huge token: FVE looks perfect, fve_typical does not."""
    d = tiny.cfg.d_model
    sae = make_identity_sae(d)
    direction = torch.zeros(d)
    direction[0] = 1.0

    def plant(act, hook):  # one token of enormous norm along e_0
        act = act.clone()
        act[2, 5] = 1e4 * direction
        return act

    with torch.no_grad():  # the SAE keeps only coordinate 0
        sae.W_dec[1:d] = 0.0
        sae.W_dec[d + 1:] = 0.0
    with tiny.hooks(fwd_hooks=[("blocks.0.hook_resid_post", plant)]):
        q = evaluate(tiny, sae, HOOK, tokens, skip_first=1)
        _, cache = tiny.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, d).double()
    norms = x.norm(dim=-1)
    keep = norms <= 10 * norms.median()
    assert q.n_outliers == int((~keep).sum()) >= 1
    assert q.fve > 0.99
    xt = x[keep]
    expected = 1 - xt[:, 1:].pow(2).sum() / (xt - xt.mean(0)).pow(2).sum()
    assert q.fve_typical == pytest.approx(expected.item(), rel=1e-6) and q.fve_typical < 0.5


def test_skip_first_defaults_to_the_sae_metadata(tiny, tokens, make_identity_sae):
    sae = make_identity_sae(tiny.cfg.d_model)
    sae.cfg.metadata.seqpos_slice = (3, None)
    assert evaluate(tiny, sae, HOOK, tokens).n_tokens == 6 * 13
    with pytest.raises(ValueError, match="no hook point"):
        evaluate(tiny, sae, "blocks.7.hook_resid_pre", tokens)
