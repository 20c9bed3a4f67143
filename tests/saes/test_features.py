"""Feature inspection against a planted SAE whose latent i is relu(x_i), and the HTML pages."""

from __future__ import annotations

import re

import pytest
import torch

from interp.saes import feature_stats, inspect_features, logit_lens, top_contexts, write_feature_pages
from interp.saes.features import token_strings

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture
def tokens():
    return torch.randint(32, 127, (12, 20), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def planted(tiny, tokens, make_identity_sae):
    """The identity SAE (skipping position 0) and the raw activations it reads."""
    sae = make_identity_sae(tiny.cfg.d_model, n_dead=4)
    sae.cfg.metadata.seqpos_slice = (1, None)
    _, cache = tiny.run_with_cache(tokens, names_filter=[HOOK])
    return sae, cache[HOOK]


def test_density_and_top_sequences_match_the_activations(tiny, tokens, planted):
    sae, x = planted
    stats = feature_stats(tiny, sae, HOOK, tokens, k=3, batch_size=5)
    xs = x[:, 1:]
    d = tiny.cfg.d_model
    torch.testing.assert_close(stats.density[:d], (xs > 0).float().mean((0, 1)))
    torch.testing.assert_close(stats.density[d:2 * d], (xs < 0).float().mean((0, 1)))
    assert stats.density[2 * d:].eq(0).all() and set(stats.live.tolist()) <= set(range(2 * d))
    for i in (0, 7, d + 5):
        signed = xs[..., i % d] * (1 if i < d else -1)
        per_seq, where = signed.max(dim=1)
        best = per_seq.topk(3).indices
        assert stats.top_seq[i].tolist() == best.tolist()
        assert stats.top_pos[i].tolist() == (where[best] + 1).tolist()
        torch.testing.assert_close(stats.top_values[i], per_seq[best])
        active = signed[signed > 0]
        assert stats.mean_active[i].item() == pytest.approx(active.mean().item(), rel=1e-5)


def test_top_contexts_carry_the_activation_of_every_token(tiny, tokens, planted):
    sae, x = planted
    contexts = top_contexts(tiny, sae, HOOK, tokens, [3], k=2, left=4, right=2)[3]
    assert len(contexts) == 2
    for c in contexts:
        window = x[c.seq, c.start:c.start + len(c.tokens), 3].clamp(min=0)
        if c.start == 0:
            window[0] = 0.0  # position 0 is skipped
        torch.testing.assert_close(torch.tensor(c.acts), window)
        assert c.tokens == token_strings(tiny, tokens[c.seq, c.start:c.start + len(c.tokens)].tolist())
        assert c.acts[c.max_pos] == pytest.approx(c.max_act) == pytest.approx(max(c.acts))


def test_logit_lens_reads_the_decoder_through_the_unembedding(tiny, planted):
    sae, _ = planted
    lens = logit_lens(tiny, sae, [2, tiny.cfg.d_model + 2], k=5)
    # latent 2 writes +e_2, latent d+2 writes -e_2: their logits are +-W_U[2]
    top = tiny.W_U[2].topk(5)
    assert [t for t, _ in lens[2][0]] == token_strings(tiny, top.indices.tolist())
    assert [v for _, v in lens[2][0]] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert [t for t, _ in lens[tiny.cfg.d_model + 2][1]] == [t for t, _ in lens[2][0]]


def test_feature_pages_are_self_contained_and_mark_activating_tokens(tiny, tokens, planted, tmp_path):
    sae, _ = planted
    reports, stats = inspect_features(tiny, sae, HOOK, tokens, features=[0, 1, 2 * tiny.cfg.d_model],
                                      k=3, left=5, right=2)
    index = write_feature_pages(tmp_path, reports, title="planted", info={"hook": HOOK}, stats=stats)
    html = index.read_text()
    for r in reports:
        page = (tmp_path / f"feature_{r.index}.html").read_text()
        assert f'href="feature_{r.index}.html"' in html
        assert "<script" not in page and "<link" not in page and "src=" not in page
        if r.contexts:  # live latents: shaded tokens, the maximum outlined
            assert re.search(r'class="tok max" style="background: rgba\(255, 120, 0, 1\.000\)"', page)
            assert page.count('class="tok max"') == len(r.contexts)
        else:
            assert "Never active" in page
    assert f"{int((stats.density == 0).sum())} dead" in html and "<svg" in html
    with pytest.raises(ValueError, match="out of range"):
        inspect_features(tiny, sae, HOOK, tokens, features=[10_000])
