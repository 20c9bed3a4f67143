"""AtP*: the QK fix against brute-force softmaxes, exactness on a linear model, GradDrop against
patching with a layer's outputs held fixed."""

from __future__ import annotations

import pytest
import torch

from interp import models
from interp.attribution.atp import attribution_patching
from interp.attribution.atp_star import atp_star, qk_fixed_head_effects
from interp.attribution.patching import exact_patching

FAMILIES = ["resid", "attn", "mlp", "heads", "heads_by_pos", "neurons"]


def test_qk_fix_equals_brute_force_softmaxes():
    """Each query and each key patched alone, the pattern recomputed by a full softmax, then
    linearised with the pattern gradient; values linear. Uses a real grouped-query attention
    module (tiny-llama: rotary, 4 query heads sharing 2 key/value heads) for the scores."""
    model = models.load("tiny-llama")
    attn = model.blocks[0].attn
    b, p, d = 2, 6, model.cfg.d_head
    h, kvh = model.cfg.n_heads, model.cfg.n_key_value_heads or model.cfg.n_heads
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    tgt = {"q": rand(b, p, h, d) * 3, "k": rand(b, p, kvh, d) * 3, "v": rand(b, p, kvh, d)}
    src = {"q": rand(b, p, h, d) * 3, "k": rand(b, p, kvh, d) * 3, "v": rand(b, p, kvh, d)}
    causal = torch.ones(p, p, dtype=torch.bool).tril()

    def scores_of(q, k):
        return attn.calculate_attention_scores(q, k).masked_fill(~causal, float("-inf"))

    with torch.no_grad():
        tgt["scores"] = scores_of(tgt["q"], tgt["k"])
        tgt["pattern"] = tgt["scores"].softmax(-1)
        g, gz = rand(b, h, p, p), rand(b, p, h, d)
        parts = qk_fixed_head_effects(attn, tgt, src, g, gz)

        A = tgt["pattern"]
        q_part = torch.zeros(p, h)
        k_part = torch.zeros(p, h)
        for t in range(p):
            q = tgt["q"].clone()
            q[:, t] = src["q"][:, t]
            q_part[t] = (g[:, :, t] * (scores_of(q, tgt["k"]).softmax(-1)[:, :, t] - A[:, :, t])).sum((0, 2))
        for s in range(p):
            k = tgt["k"].clone()
            k[:, s] = src["k"][:, s]
            changed = scores_of(tgt["q"], tgt["k"]).clone()
            changed[..., s] = scores_of(tgt["q"], k)[..., s]
            k_part += _query_head(g * (changed.softmax(-1) - A))
        dv = torch.repeat_interleave(src["v"] - tgt["v"], h // kvh, dim=2)
        v_part = (torch.einsum("bhqk,bkhd->bqhd", A, dv) * gz).sum((0, 3))
    torch.testing.assert_close(parts[0], q_part, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(parts[1], k_part, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(parts[2], v_part, atol=1e-4, rtol=1e-4)
    assert parts[:2].abs().max() > 1e-2  # the pattern moves: not a comparison of zeros


def _query_head(x):
    """`[batch, head, query, key]` summed over batch and key: `[query, head]`."""
    return x.sum((0, 3)).T


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_star_equals_exact_patching_on_a_linear_model(direction, linear_model, random_pairs):
    """Fixed attention patterns (W_Q = W_K = 0) make the query and key parts zero and the value
    part exact: AtP* equals exact patching on every family."""
    model = linear_model
    clean, corrupt, metric = random_pairs(model)
    fams = ["resid", "attn", "mlp", "heads", "heads_by_pos"]
    exact = exact_patching(model, clean, corrupt, metric, fams, direction=direction, progress=False)
    star = atp_star(model, clean, corrupt, metric, fams, direction=direction)
    for fam in fams:
        assert star[fam].method == "atp_star"
        assert exact[fam].values.abs().max() > 1e-2 or fam == "mlp", fam
        torch.testing.assert_close(star[fam].values, exact[fam].values, atol=1e-4, rtol=0)


def test_atp_star_is_atp_outside_heads_and_differs_on_heads(random_pairs):
    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model, batch=3, pos=7)
    atp = attribution_patching(model, clean, corrupt, metric, FAMILIES)
    star = atp_star(model, clean, corrupt, metric, FAMILIES)
    for fam in ("attn", "mlp", "neurons"):
        torch.testing.assert_close(star[fam].values, atp[fam].values, atol=1e-6, rtol=0)
    # resid: the QK fix recomputes the next patterns (test_atp_star_qkv.py); qk_layers=0 is AtP
    no_fix = atp_star(model, clean, corrupt, metric, ["resid"], qk_layers=0)
    torch.testing.assert_close(no_fix["resid"].values, atp["resid"].values, atol=1e-6, rtol=0)
    for fam in ("resid", "heads", "heads_by_pos"):
        assert star[fam].values.shape == atp[fam].values.shape
        assert not torch.allclose(star[fam].values, atp[fam].values, atol=1e-4)
    # heads_by_pos parts reach each query position; summed over positions they are the heads scores
    torch.testing.assert_close(star["heads_by_pos"].values.sum(1), star["heads"].values,
                               atol=1e-5, rtol=1e-5)


def test_graddrop_equals_patching_with_each_layer_held_fixed(linear_model, random_pairs):
    """On a linear model the estimate with layer l's gradient dropped is exactly the effect of
    patching a site while layer l's attention and MLP outputs are held at the target run's
    values (the hold applied after the patch); GradDrop is the sum of the magnitudes over
    layers divided by L - 1, as in the paper."""
    model = linear_model
    clean, corrupt, metric = random_pairs(model)
    star = atp_star(model, clean, corrupt, metric, ["resid", "attn", "heads"], grad_drop=True)
    _, target_cache = model.run_with_cache(corrupt)
    _, source_cache = model.run_with_cache(clean)
    n_layers, n_pos, n_heads = model.cfg.n_layers, clean.shape[1], model.cfg.n_heads
    sites = {
        "resid": ("blocks.{L}.hook_resid_pre", [(p,) for p in range(n_pos)]),
        "attn": ("blocks.{L}.hook_attn_out", [(p,) for p in range(n_pos)]),
        "heads": ("blocks.{L}.attn.hook_z", [(slice(None), h) for h in range(n_heads)]),
    }
    baseline = metric(model(corrupt)).mean()
    for fam, (template, indices) in sites.items():
        expected = torch.zeros(n_layers, len(indices))
        for layer in range(n_layers):
            name = template.format(L=layer)
            for i, index in enumerate(indices):
                def patch(act, hook, index=index):
                    act = act.clone()
                    act[(slice(None), *index)] = source_cache[hook.name][(slice(None), *index)]
                    return act
                for held in range(n_layers):
                    hold = [(f"blocks.{held}.{out}", lambda act, hook: target_cache[hook.name])
                            for out in ("hook_attn_out", "hook_mlp_out")]
                    logits = model.run_with_hooks(corrupt, fwd_hooks=[(name, patch), *hold])
                    expected[layer, i] += (metric(logits).mean() - baseline).abs().item() / (n_layers - 1)
        assert star[fam].method == "atp_star_graddrop"
        assert expected.max() > 1e-2
        torch.testing.assert_close(star[fam].values.reshape(n_layers, -1), expected, atol=1e-4, rtol=0)
