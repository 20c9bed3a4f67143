"""attach(): logits kept with the error term, latents as hook points, exact gradients, errors."""

from __future__ import annotations

import pytest
import torch

from interp.saes import attach, attached_saes, detach, latent_hook_name

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture
def tokens():
    return torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))


def _clean_acts(model, tokens, hook):
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    return cache[hook]


def test_error_term_keeps_logits_and_without_it_they_change(tiny, tokens, make_topk_sae):
    sae = make_topk_sae(64, 256, 8)
    clean = tiny(tokens)
    with attach(tiny, {HOOK: sae}) as att:
        unobserved = tiny(tokens)
        # Observing the latents makes the SAE run: reconstruction + error term.
        observed, cache = tiny.run_with_cache(tokens, names_filter=att.hook_names())
        assert cache[latent_hook_name(HOOK)].abs().sum() > 0
        att.splices[HOOK].use_error_term = False
        spliced = tiny(tokens)
    assert torch.equal(unobserved, clean)
    torch.testing.assert_close(observed, clean, atol=1e-4, rtol=1e-4)
    assert (spliced - clean).abs().max() > 0.1  # a random SAE reconstructs badly
    torch.testing.assert_close(tiny(tokens), clean, atol=0, rtol=0)  # detached on exit


def test_latents_are_hook_points_equal_to_encoding_the_clean_activation(tiny, tokens, make_topk_sae):
    sae = make_topk_sae(64, 256, 8)
    x = _clean_acts(tiny, tokens, HOOK)
    with attach(tiny, {HOOK: sae}, use_error_term=False) as att:
        names = [latent_hook_name(HOOK, p) for p in
                 ("input", "acts_pre", "acts_post", "recons", "error", "output")]
        assert set(names) <= set(tiny.hook_dict)
        _, cache = tiny.run_with_cache(tokens, names_filter=att.hook_names() + [HOOK])
    with torch.no_grad():
        expected = sae.encode(x)
    torch.testing.assert_close(cache[latent_hook_name(HOOK)], expected)
    assert (cache[latent_hook_name(HOOK)] > 0).sum(-1).eq(8).all()  # TopK: k active per token
    # the original hook point sees what flows on: the reconstruction (no error term)
    torch.testing.assert_close(cache[HOOK], sae.decode(expected).detach())


def _grads(model, tokens, names):
    grads = {}

    def save(grad, hook):
        grads[hook.name] = grad.detach().clone()

    with model.hooks(bwd_hooks=[(n, save) for n in names]):
        logits = model(tokens)
        logits[:, -1, :5].sum().backward()
    return grads


def test_gradients_reach_latents_and_error_and_upstream_gradient_is_exact(tiny, tokens, make_topk_sae):
    sae = make_topk_sae(64, 256, 8)
    plain = _grads(tiny, tokens, ["hook_embed", HOOK])
    acts, err = latent_hook_name(HOOK, "acts_post"), latent_hook_name(HOOK, "error")
    with attach(tiny, {HOOK: sae}):
        grads = _grads(tiny, tokens, ["hook_embed", HOOK, acts, err])
    g_out = grads[HOOK]
    torch.testing.assert_close(g_out, plain[HOOK], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[acts], g_out @ sae.W_dec.detach().T, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[err], g_out, atol=1e-6, rtol=1e-5)
    # the error node makes the upstream gradient the model's own, not the SAE's Jacobian
    scale = plain["hook_embed"].abs().max()
    torch.testing.assert_close(grads["hook_embed"], plain["hook_embed"], atol=1e-4 * scale, rtol=0)
    with attach(tiny, {HOOK: sae}, use_error_term=False):
        through_sae = _grads(tiny, tokens, ["hook_embed"])
    assert (through_sae["hook_embed"] - plain["hook_embed"]).abs().max() > 0.1 * scale
    for p in sae.parameters():
        p.grad = None


def test_editing_a_latent_changes_the_output_by_its_decoded_contribution(tiny, tokens, make_topk_sae):
    sae = make_topk_sae(64, 256, 8)
    acts_name, out_name = latent_hook_name(HOOK), latent_hook_name(HOOK, "output")
    with attach(tiny, {HOOK: sae}):
        _, cache = tiny.run_with_cache(tokens, names_filter=[acts_name, out_name])
        f = cache[acts_name]
        b, p = 1, 5
        latent = int(f[b, p].argmax())

        def zero_latent(act, hook):
            act = act.clone()
            act[b, p, latent] = 0.0
            return act

        with tiny.hooks(fwd_hooks=[(acts_name, zero_latent)]):
            _, patched = tiny.run_with_cache(tokens, names_filter=[out_name])
    delta = patched[out_name] - cache[out_name]
    expected = torch.zeros_like(delta)
    expected[b, p] = -f[b, p, latent] * sae.W_dec[latent].detach()
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)


def test_zeroing_the_error_equals_running_without_error_term(tiny, tokens, make_topk_sae):
    sae = make_topk_sae(64, 256, 8)
    with attach(tiny, {HOOK: sae}, use_error_term=False):
        without = tiny(tokens)
    with attach(tiny, {HOOK: sae}):
        with tiny.hooks(fwd_hooks=[(latent_hook_name(HOOK, "error"), lambda a, hook: torch.zeros_like(a))]):
            zeroed = tiny(tokens)
    torch.testing.assert_close(zeroed, without, atol=1e-5, rtol=1e-5)


def test_detach_restores_the_model_and_several_saes_attach_by_metadata(tiny, tokens, make_topk_sae):
    clean = tiny(tokens)
    hooks_before = set(tiny.hook_dict)
    saes = [make_topk_sae(64, 128, 4, "blocks.0.hook_resid_pre", seed=1),
            make_topk_sae(64, 128, 4, "blocks.1.hook_mlp_out", seed=2)]
    att = attach(tiny, saes)
    assert set(attached_saes(tiny)) == {"blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"}
    observed, _ = tiny.run_with_cache(tokens, names_filter=att.hook_names())
    torch.testing.assert_close(observed, clean, atol=1e-4, rtol=1e-4)
    att.detach()
    att.detach()  # idempotent
    assert set(tiny.hook_dict) == hooks_before and attached_saes(tiny) == {}
    assert not tiny.hook_dict["blocks.0.hook_resid_pre"]._forward_pre_hooks
    assert saes[0].hook_sae_acts_post.name == "hook_sae_acts_post"
    assert torch.equal(tiny(tokens), clean)
    attach(tiny, saes[:1])
    detach(tiny)
    assert attached_saes(tiny) == {}


def test_skipped_positions_pass_through_and_their_latents_get_no_gradient(tiny, tokens, make_topk_sae):
    sae = make_topk_sae(64, 256, 8)
    sae.cfg.metadata.seqpos_slice = (2, None)  # as if trained without positions 0 and 1
    clean = tiny(tokens)
    with attach(tiny, {HOOK: sae}, use_error_term=False) as att:
        assert att.splices[HOOK].skip_first == 2
        spliced = tiny(tokens)
        grads = _grads(tiny, tokens, [latent_hook_name(HOOK)])
    torch.testing.assert_close(spliced[:, :2], clean[:, :2], atol=1e-5, rtol=1e-5)
    assert (spliced[:, 2:] - clean[:, 2:]).abs().max() > 0.1
    g = grads[latent_hook_name(HOOK)]
    assert g[:, :2].abs().max() == 0 and g[:, 2:].abs().max() > 0
    with attach(tiny, {HOOK: sae}, use_error_term=False, skip_first=0):
        assert (tiny(tokens)[:, :2] - clean[:, :2]).abs().max() > 0.1
    for p in sae.parameters():
        p.grad = None


def test_clear_errors(tiny, tokens, make_topk_sae):
    with pytest.raises(ValueError, match=r"d_in=32.*width 64"):
        attach(tiny, {HOOK: make_topk_sae(32, 64, 4)})
    with pytest.raises(ValueError, match=r"no hook point 'blocks.1.hook_resid_pree'.*did you mean blocks.1.hook_resid_pre"):
        attach(tiny, {"blocks.1.hook_resid_pree": make_topk_sae(64, 64, 4)})
    with pytest.raises(ValueError, match=r"dtype mismatch.*torch.float64.*float32"):
        attach(tiny, {HOOK: make_topk_sae(64, 64, 4).to(torch.float64)})
    with pytest.raises(ValueError, match=r"trained at blocks.0.hook_resid_pre.*check_metadata=False"):
        attach(tiny, {HOOK: make_topk_sae(64, 64, 4, "blocks.0.hook_resid_pre")})
    with pytest.raises(ValueError, match=r"no hook name in its metadata"):
        attach(tiny, [make_topk_sae(64, 64, 4)])
    with attach(tiny, {HOOK: make_topk_sae(64, 64, 4)}):
        with pytest.raises(ValueError, match="already has an SAE attached"):
            attach(tiny, {HOOK: make_topk_sae(64, 64, 4)})
    # a hook whose width the config does not tell is checked at the first forward pass
    with attach(tiny, {"blocks.0.attn.hook_pattern": make_topk_sae(64, 64, 4)}, use_error_term=False):
        with pytest.raises(ValueError, match=r"d_in=64.*width 12"):
            tiny(tokens)
    assert attached_saes(tiny) == {}


def test_default_model_logits_unchanged_with_error_term(default_model, make_topk_sae):
    model = default_model
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    hook = "blocks.3.hook_resid_pre"
    sae = make_topk_sae(model.cfg.d_model, 1024, 16)
    # scale the random SAE to the activations so that it is a (bad) reconstruction, not noise
    with torch.no_grad():
        sae.W_dec.mul_(_clean_acts(model, tokens, hook)[0, 1:].norm(dim=-1).mean() / 4)
    clean = model(tokens)
    try:
        with attach(model, {hook: sae}) as att:
            observed, cache = model.run_with_cache(tokens, names_filter=att.hook_names())
            att.splices[hook].use_error_term = False
            spliced = model(tokens)
    finally:
        detach(model) if attached_saes(model) else None
    assert cache[latent_hook_name(hook)].shape == (1, tokens.shape[1], 1024)
    torch.testing.assert_close(observed, clean, atol=2e-3, rtol=1e-4)
    assert (spliced - clean).abs().max() > 1.0
