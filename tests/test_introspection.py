"""The introspection protocol: injection positions under left padding (prompt and generated
tokens), concept vectors against `run_with_cache`, the Yes-No gap against a plain forward, the
grader's metrics on hand-written transcripts, and the trained bias learning a planted rule.

The model is a tiny random Llama with the default model's tokenizer and chat template."""

from __future__ import annotations

import math

import pytest
import torch

from interp import hooks as H
from interp import introspection as I
from interp import models
from interp.generation import generate_with, token_lists
from interp.judges import IntrospectionTrial


@pytest.fixture(scope="module")
def tiny(tiny_chat_model_dir):
    model = models.load(str(tiny_chat_model_dir), device="cpu")
    yield model
    model.reset_hooks()


@pytest.fixture(scope="module")
def template():
    return I.load_templates()["ORIGINAL"]


def test_templates_and_concepts_load():
    templates = I.load_templates()
    assert {"ORIGINAL", "SKEPTICAL", "STRUCTURED_FORMAT", "UNPROMPTED"} <= set(templates)
    assert "ANTI_REWARD" not in templates  # needs a category
    concepts = I.load_concepts()
    assert len(concepts.test) == 50 and len(concepts.baseline) == 100 and len(concepts.extra) == 450
    train, held = concepts.split(400, 50, seed=42)
    assert len(train) == 400 and len(held) == 50 and not set(train) & set(held)
    assert concepts.split(400, 50, seed=42) == (train, held)
    with pytest.raises(ValueError, match="only 450"):
        concepts.split(400, 100 + 1)


def test_marker_is_the_token_before_trial(tiny, template):
    prompt = I.trial_prompt(tiny, template, 7)
    ids = token_lists(tiny, [prompt])[0]
    from interp.generation import resolve_start
    start = resolve_start(tiny, prompt, ids, I.injection_marker(7))
    # the text of the tokens before `start + 1` ends just before "Trial 7"
    before = tiny.tokenizer.decode(ids[:start + 1])
    after = tiny.tokenizer.decode(ids[start + 1:])
    assert after.startswith("Trial 7") and not before.endswith("Trial")


def test_injection_lands_from_the_marker_under_left_padding(tiny, template):
    """The difference between resid_post of layer L before the steer (captured first) and
    resid_pre of layer L+1 (after it) is exactly strength * v from each injected row's marker
    on, through every generated token, and zero before it and in the control row."""
    layer, strength = 1, 3.0
    v = torch.randn(tiny.cfg.d_model)
    prompts = [I.trial_prompt(tiny, template, 1), I.trial_prompt(tiny, template, 12345),
               I.trial_prompt(tiny, template, 5, prefill=I.FORCED_PREFILL)]
    markers = [I.injection_marker(1), None, I.injection_marker(5)]
    rows = token_lists(tiny, prompts)
    assert len({len(r) for r in rows}) == 3  # different lengths: real left padding
    inj = I.Injection(v, layer, strength)
    new = 5
    with H.capture(tiny, [f"blocks.{layer}.hook_resid_post", f"blocks.{layer + 1}.hook_resid_pre"],
                   append=True) as got:
        gen = generate_with(tiny, prompts, hooks=[inj.hook(tiny)], max_new_tokens=new,
                            start=markers, stop_tokens=(), batch_size=3, progress=False)
    before = torch.cat(got[f"blocks.{layer}.hook_resid_post"], dim=1)
    after = torch.cat(got[f"blocks.{layer + 1}.hook_resid_pre"], dim=1)
    width = max(len(r) for r in rows)
    assert before.shape[1] == width + new - 1
    diff = after - before
    # rows come back from generate_with sorted by length (longest first); map them back
    order = sorted(range(3), key=lambda i: -len(rows[i]))
    for b, i in enumerate(order):
        if markers[i] is None:
            assert gen.starts[i] is None
            assert diff[b].abs().max() == 0
            continue
        start = width - len(rows[i]) + gen.starts[i]
        assert diff[b, :start].abs().max() == 0
        torch.testing.assert_close(diff[b, start:], (strength * v).expand_as(diff[b, start:]),
                                   rtol=1e-5, atol=1e-5)


def test_injection_hooks_keep_rows_apart(tiny):
    """Two rows with different vectors and a control row in one forward: each injected row gets
    its own vector from its own start, the control row nothing."""
    layer = 2
    v1, v2 = torch.randn(tiny.cfg.d_model), torch.randn(tiny.cfg.d_model)
    tokens = torch.randint(100, 1000, (3, 9))
    injections = [I.Injection(v1, layer, 2.0), None, I.Injection(v2, layer, -1.0)]
    hooks = I.injection_hooks(tiny, injections, [4, None, 6])
    assert len(hooks) == 2
    name = f"blocks.{layer}.hook_resid_post"
    _, clean = tiny.run_with_cache(tokens, names_filter=name)
    with tiny.hooks(fwd_hooks=[fh for h in hooks for fh in h.fwd_hooks()]):
        _, hooked = tiny.run_with_cache(tokens, names_filter=name)
    diff = hooked[name] - clean[name]
    torch.testing.assert_close(diff[0, 4:], (2.0 * v1).expand(5, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diff[2, 6:], (-1.0 * v2).expand(3, -1), rtol=1e-5, atol=1e-5)
    assert diff[0, :4].abs().max() == 0 and diff[2, :6].abs().max() == 0
    assert diff[1].abs().max() == 0
    with pytest.raises(ValueError, match="no start"):
        I.injection_hooks(tiny, injections, [4, None, None])


def test_concept_vectors_equal_run_with_cache(tiny):
    words, baseline, layers = ["Dust", "Satellites"], ["Desks", "Jackets", "Sand"], [0, 2, 3]
    got = I.concept_vectors(tiny, words, baseline, layers, batch_size=2)
    assert got.shape == (3, 2, tiny.cfg.d_model)

    def last(word, layer):
        text = tiny.tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {word}"}],
                                                  tokenize=False, add_generation_prompt=True)
        ids = tiny.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        _, cache = tiny.run_with_cache(ids)
        return cache[f"blocks.{layer}.hook_resid_post"][0, -1]

    for li, layer in enumerate(layers):
        base = torch.stack([last(w, layer) for w in baseline]).mean(0)
        for wi, w in enumerate(words):
            torch.testing.assert_close(got[li, wi], last(w, layer) - base, rtol=1e-4, atol=1e-4)


def test_yes_no_gap_equals_hand_logsumexp(tiny, template):
    layer, strength = 1, 4.0
    v = torch.randn(tiny.cfg.d_model)
    prompts = [I.trial_prompt(tiny, template, 1), I.trial_prompt(tiny, template, 1234)]
    inj = I.Injection(v, layer, strength)
    gaps = I.yes_no_gap(tiny, prompts, [inj, None], [I.injection_marker(1), None], batch_size=2)
    yes, no = I.yes_no_tokens(tiny)
    assert "Yes" in [tiny.tokenizer.decode([t]) for t in yes]

    def hand(prompt, start):
        ids = torch.tensor(token_lists(tiny, [prompt]))
        hooks = [] if start is None else H.steer(tiny, v, [layer], hook="resid_post", scale=strength,
                                                from_position=start).fwd_hooks()
        logits = tiny.run_with_hooks(ids, fwd_hooks=hooks)[0, -1]
        return (logits[yes].logsumexp(0) - logits[no].logsumexp(0)).item()

    from interp.generation import resolve_start
    start = resolve_start(tiny, prompts[0], token_lists(tiny, [prompts[0]])[0], I.injection_marker(1))
    assert gaps[0].item() == pytest.approx(hand(prompts[0], start), abs=1e-4)
    assert gaps[1].item() == pytest.approx(hand(prompts[1], None), abs=1e-4)
    assert gaps[0].item() != pytest.approx(gaps[1].item(), abs=1e-3)


def test_attribution_estimates_the_exact_ablation_effect_with_its_sign(tiny, template):
    """In the linear regime (a small injection) AtP's first-order estimate of each later
    component's ablation effect (injected minus patched) is that effect, sign included."""
    torch.manual_seed(0)
    vecs = [torch.randn(tiny.cfg.d_model) for _ in range(2)]
    injections = [I.Injection(v, 0, 0.05) for v in vecs]
    prompt, marker = I.trial_prompt(tiny, template, 1), I.injection_marker(1)
    exact = I.component_effects(tiny, prompt, marker, injections, [1, 2, 3])
    atp = I.attribution_effects(tiny, prompt, marker, injections, [1, 2, 3])
    for fam in ("attn", "mlp"):
        want, got = torch.tensor(exact[fam]["ablation"]), torch.tensor(atp[fam])
        assert want.abs().max() > 1e-6  # the injection reaches them
        torch.testing.assert_close(got, want, rtol=0.1, atol=0.05 * float(want.abs().max()))
    # the heads' estimates add up to the attention output's (z -> W_O is linear)
    heads = torch.tensor(atp["heads"]).sum(-1)
    torch.testing.assert_close(heads, torch.tensor(atp["attn"]), rtol=1e-3, atol=1e-6)


def test_norms_and_random_control(tiny, template):
    prompt = I.trial_prompt(tiny, template, 1)
    norms = I.residual_norm(tiny, prompt, [0, 3])
    _, cache = tiny.run_with_cache(torch.tensor(token_lists(tiny, [prompt])))
    for k, layer in enumerate([0, 3]):
        hand = cache[f"blocks.{layer}.hook_resid_post"][0, 1:].norm(dim=-1).median()
        assert norms[k].item() == pytest.approx(hand.item(), rel=1e-5)
    assert I.relative_strength(4.0, 2.0, 16.0) == 0.5
    vecs = torch.randn(5, 16) * torch.arange(1, 6)[:, None]
    rand = I.random_like(vecs, seed=3)
    torch.testing.assert_close(rand.norm(dim=-1), vecs.norm(dim=-1))
    assert torch.equal(rand, I.random_like(vecs, seed=3))
    assert (torch.nn.functional.cosine_similarity(rand, vecs).abs() < 0.99).all()


def test_metrics_on_hand_written_transcripts():
    trials = [
        IntrospectionTrial("Yes, I detect an injected thought about dust.", "Dust", "injection"),
        IntrospectionTrial("No, I don't detect anything unusual.", "Dust", "injection"),
        IntrospectionTrial("I notice an unusual thought, but I can't say what.", "Trees", "injection"),
        IntrospectionTrial("Trees. I detect a thought about trees.", "Trees", "injection"),
        IntrospectionTrial("No, I do not detect an injected thought.", None, "control"),
        IntrospectionTrial("Yes, I notice something strange.", None, "control"),
        IntrospectionTrial(" tiny particles of dust floating in the air.", "Dust", "forced"),
        IntrospectionTrial(" the ocean and its waves.", "Trees", "forced"),
    ]
    m = I.trial_metrics(I.TrialResults(trials, [1] * 8, [1.0] * 8))
    assert set(I.METRIC_NAMES) <= set(m)
    assert (m["detection_hit_rate"]["k"], m["detection_hit_rate"]["n"]) == (2, 4)
    assert (m["detection_false_alarm_rate"]["k"], m["detection_false_alarm_rate"]["n"]) == (1, 2)
    ident = m["identification_accuracy_given_claim"]
    assert (ident["k"], ident["n"]) == (1, 2)
    combined = m["combined_detection_and_identification_rate"]
    assert (combined["k"], combined["n"]) == (1, 4)
    forced = m["forced_identification_accuracy"]
    assert (forced["k"], forced["n"]) == (1, 2)
    # Wilson 95% for 1/2 by hand: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    z, n, p = 1.959964, 2, 0.5
    centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    assert forced["ci"] == pytest.approx([lo, hi], abs=1e-4)


def test_target_cross_entropy_equals_the_training_loss(tiny, template):
    from interp.training import collate, cross_entropy
    prompt = I.trial_prompt(tiny, template, 3)
    examples = [I.bias_example(tiny, prompt, t, I.injection_marker(3))[0]
                for t in ("Yes, I do.", "No")]
    batch = collate(examples)
    resid = tiny(batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=tiny.cfg.n_layers)
    full = cross_entropy(tiny(batch.tokens, attention_mask=batch.attention_mask), batch)
    assert I.target_cross_entropy(tiny, resid, batch).item() == pytest.approx(full.item(), rel=1e-5)


def test_coherence_flags_broken_text(tiny, template):
    prompt = I.trial_prompt(tiny, template, 1)
    ppl = I.completion_perplexity(tiny, [prompt, prompt, prompt], ["Hello there.", "dust dust dust", ""])
    # by hand: exp(mean NLL) of the completion's tokens after the prompt
    ids = token_lists(tiny, [prompt])[0]
    tail = tiny.tokenizer.encode("Hello there.", add_special_tokens=False)
    logp = tiny(torch.tensor([ids + tail]))[0].log_softmax(-1)
    nll = -torch.stack([logp[len(ids) - 1 + k, t] for k, t in enumerate(tail)]).mean()
    assert ppl[0] == pytest.approx(nll.exp().item(), rel=1e-4)
    assert math.isnan(ppl[2])
    assert I.coherent("Hello there.", 10.0) and not I.coherent("Hello there.", 1e4)
    assert not I.coherent("dust dust dust", 1.0) and not I.coherent("", 1.0)


def test_trained_bias_learns_a_planted_rule(tiny_chat_model_dir, template):
    """Detect exactly when a planted vector is injected: before training the tiny model says
    Yes (positive Yes-No gap) to injected and control trials alike; after training a bias on
    one MLP output (all weights frozen) every injected trial has a positive gap and every
    control trial a negative one, on trial numbers not seen in training. The random model's
    unembedding is scaled by 30 so that its logits have the range of a trained model's (at
    initialisation every token is nearly equally likely and no bias can make an answer
    likely)."""
    tiny = models.load(str(tiny_chat_model_dir), device="cpu")
    with torch.no_grad():
        tiny.unembed.W_U.mul_(30)
    yes, no = I.yes_no_tokens(tiny)
    # planted along the unembedding's Yes-minus-No direction, so that injecting it moves the
    # gap one way; the bias must learn where the threshold lies (and keep controls at No)
    planted = tiny.W_U[:, yes].mean(1) - tiny.W_U[:, no].mean(1)
    # small (0.3 of the residual norm): before training both kinds of trial answer No
    scale = 0.3 * I.residual_norm(tiny, I.trial_prompt(tiny, template, 1), [1])[0]
    planted = (scale * planted / planted.norm()).detach()
    inj = I.Injection(planted, 1, 1.0)
    examples = []
    for t in range(1, 7):
        prompt = I.trial_prompt(tiny, template, t)
        for injection, target in ((inj, "Yes"), (None, "No")):
            ex, start = I.bias_example(tiny, prompt, target, I.injection_marker(t))
            examples.append((ex, start, injection))
    weights = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    test_prompts = [I.trial_prompt(tiny, template, t) for t in (21, 22, 23)]
    markers = [I.injection_marker(t) for t in (21, 22, 23)]

    def gaps(extra=()):
        with tiny.hooks(fwd_hooks=[fh for h in extra for fh in h.fwd_hooks()]):
            a = I.yes_no_gap(tiny, test_prompts, [inj] * 3, markers)
            b = I.yes_no_gap(tiny, test_prompts)
        return a, b

    a0, b0 = gaps()
    assert (a0 > 0).all() and (b0 > 0).all(), (a0, b0)  # no detection rule before training
    result = I.train_bias(tiny, layer=2, examples=examples, steps=150, lr=2e-3, batch_size=8)
    assert result.losses[-1] < result.losses[0]
    a1, b1 = gaps([result.hook(tiny)])
    assert (a1 > 0).all() and (b1 < 0).all(), (a1, b1)
    for n, p in tiny.named_parameters():  # everything else frozen and unchanged
        assert torch.equal(p, weights[n])


def _relu_sae(d_in: int, d_sae: int, hook_name: str, seed: int = 0):
    """A ReLU SAE with random weights, its metadata naming `hook_name`."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) / d_in**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.b_dec.zero_()
    sae.cfg.metadata.hook_name = hook_name
    return sae


def test_latent_attributions_estimate_single_latent_ablations(tiny, template):
    """AtP to SAE latents (attached with the error term) equals the exact effect of setting
    each latent to its control value, in the linear regime; the model's gap is unchanged by
    attaching."""
    from interp.saes import attach, latent_hook_name

    hook = "blocks.2.hook_mlp_out"
    sae = _relu_sae(tiny.cfg.d_model, 48, hook)
    torch.manual_seed(1)
    injections = [I.Injection(torch.randn(tiny.cfg.d_model), 0, 0.05) for _ in range(2)]
    prompt, marker = I.trial_prompt(tiny, template, 1), I.injection_marker(1)
    before = I.component_effects(tiny, prompt, marker, injections, [3])
    with attach(tiny, {hook: sae}, skip_first=0):
        name = latent_hook_name(hook)
        after = I.component_effects(tiny, prompt, marker, injections, [3])
        atp = I.latent_attributions(tiny, prompt, marker, injections, [name])[name]
        assert atp.shape == (48,)
        top = torch.argsort(atp.abs(), descending=True)[:6].tolist()
        exact = torch.tensor(I.latent_ablation_effects(tiny, prompt, marker, injections, name, top))
    assert after["gap_injected"] == pytest.approx(before["gap_injected"], abs=1e-5)
    assert exact.abs().max() > 1e-7  # the injection reaches the latents
    torch.testing.assert_close(atp[top], exact, rtol=0.1, atol=0.05 * float(exact.abs().max()))


def test_gate_latents_rank_by_decoder_direct_effect_times_control_activation(tiny, template):
    """Gate latents against a hand computation from `run_with_cache`: direct effect =
    W_dec[j] . (mean W_U[:, Yes] - mean W_U[:, No]), push = direct effect x the control
    activation at the last position; only negative pushes, most negative first."""
    from interp.saes import attach, latent_hook_name

    hook = "blocks.3.hook_mlp_out"
    sae = _relu_sae(tiny.cfg.d_model, 40, hook, seed=2)
    injections = [I.Injection(torch.randn(tiny.cfg.d_model), 1, 1.0)]
    prompt, marker = I.trial_prompt(tiny, template, 1), I.injection_marker(1)
    yes, no = I.yes_no_tokens(tiny)
    direction = tiny.W_U[:, yes].mean(1) - tiny.W_U[:, no].mean(1)
    with attach(tiny, {hook: sae}, skip_first=0):
        rows = I.gate_latents(tiny, prompt, marker, injections, {hook: sae}, top=5)
        name = latent_hook_name(hook)
        ids = torch.tensor([token_lists(tiny, [prompt])[0]])  # the tokens the study runs
        _, cache = tiny.run_with_cache(ids, names_filter=name)
    push = (sae.W_dec.detach() @ direction.detach()) * cache[name][0, -1]
    want = [j for j in torch.argsort(push)[:5].tolist() if push[j] < 0]
    assert want, "the random SAE should have some latent pushing towards No"
    assert [r["latent"] for r in rows] == want
    for r in rows:
        assert r["site"] == name
        assert r["push_control"] == pytest.approx(float(push[r["latent"]]), rel=1e-4, abs=1e-6)


def test_evidence_latents_find_a_planted_reader_of_the_injected_vector(tiny, template):
    """A latent whose encoder reads the injected direction rises strictly with the strength
    and tops the list; an SAE before the injection is refused."""
    from interp.saes import attach

    hook = "blocks.2.hook_resid_pre"  # right after the injection at blocks.1.hook_resid_post
    sae = _relu_sae(tiny.cfg.d_model, 32, hook, seed=3)
    torch.manual_seed(4)
    v = torch.randn(tiny.cfg.d_model)
    with torch.no_grad():
        sae.W_enc[:, 7] = 10 * v / v.norm()
        sae.b_enc[7] = 50.0  # active at strength 0 too, so every step is a strict rise
    prompt, marker = I.trial_prompt(tiny, template, 1), I.injection_marker(1)
    with attach(tiny, {hook: sae}, skip_first=0):
        found = I.evidence_latents(tiny, prompt, marker, v[None], 1, [1.0, 2.0, 4.0], hook)
        with pytest.raises(ValueError, match="not after the injection layer"):
            I.evidence_latents(tiny, prompt, marker, v[None], 2, [1.0], hook)
    assert found["n_latents"] == 32 and found["strengths"] == [0.0, 1.0, 2.0, 4.0]
    assert found["top"][0]["latent"] == 7
    means = found["top"][0]["means"]
    assert all(b > a for a, b in zip(means, means[1:]))
