"""Tests for interp.concepts.vectors: planted directions, the math of each intervention, and
independent reference computations (plain TransformerLens hooks, per-prompt greedy loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interp import hooks
from interp.concepts import vectors as V
from interp.models import load

MODELS = ["tiny-gpt2", "tiny-llama"]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return load(request.param)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# --------------------------------------------------------------------------------------------
# Building directions
# --------------------------------------------------------------------------------------------


def test_diff_of_means_recovers_a_planted_vector():
    g = _gen(0)
    d, n = 32, 4000
    planted = torch.randn(d, generator=g) * 0.7
    negative = torch.randn(n, d, generator=g) * 2.0 + 5.0  # anisotropic offset, same in both
    positive = torch.randn(n + 500, d, generator=g) * 2.0 + 5.0 + planted
    found = V.diff_of_means(positive, negative)
    assert found.shape == (d,)
    # Sampling error of a difference of two means: sigma * sqrt(1/n1 + 1/n2) per coordinate.
    assert (found - planted).abs().max() < 5 * 2.0 * (1 / n + 1 / (n + 500)) ** 0.5
    assert F.cosine_similarity(found, planted, dim=0) > 0.99
    # Exactly: the same activations shifted by the vector.
    assert torch.allclose(V.diff_of_means(negative + planted, negative), planted, atol=1e-5)
    assert torch.allclose(V.normalised_diff_of_means(negative + planted, negative),
                          planted / planted.norm(), atol=1e-5)


def test_diff_of_means_keeps_middle_axes_one_vector_per_layer():
    g = _gen(1)
    planted = torch.randn(3, 8, generator=g)  # a different vector per "layer"
    negative = torch.randn(50, 3, 8, generator=g)
    found = V.diff_of_means(negative + planted, negative[:20])
    manual = (negative + planted).mean(0) - negative[:20].mean(0)
    assert found.shape == (3, 8) and torch.allclose(found, manual, atol=1e-6)


@pytest.mark.unchecked
def test_diff_of_means_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="must agree on every axis"):
        V.diff_of_means(torch.zeros(4, 8), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="n_examples"):
        V.diff_of_means(torch.zeros(8), torch.zeros(8))
    with pytest.raises(TypeError, match="floats"):
        V.diff_of_means(torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="zero vector"):
        V.unit(torch.zeros(3))


def test_pca_of_differences_finds_the_shared_direction_of_pairs():
    g = _gen(2)
    n, d = 200, 24
    v = F.normalize(torch.randn(d, generator=g), dim=0)
    base = torch.randn(n, d, generator=g) * 3.0  # what each pair shares
    strength = 1.0 + torch.rand(n, generator=g)  # every pair differs along v, by 1..2
    noise = torch.randn(n, d, generator=g) * 0.05
    positive, negative = base + strength[:, None] * v + noise, base
    pca = V.pca_of_differences(positive, negative, k=2)
    assert pca.components.shape == (2, d) and pca.explained.shape == (2,)
    assert F.cosine_similarity(pca.components[0], v, dim=0) > 0.999  # sign points neg -> pos
    assert pca.explained[0] > 0.95
    assert torch.allclose(pca.components.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert pca.mean_projection[0] == pytest.approx(float(strength.mean()), rel=0.02)
    # Swapping the roles flips the direction.
    flipped = V.pca_of_differences(negative, positive, k=1)
    assert F.cosine_similarity(flipped.components[0], v, dim=0) < -0.999


def test_centred_pca_of_differences_finds_how_differences_vary():
    g = _gen(3)
    n, d = 300, 16
    v, w = torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T  # orthonormal pair
    t = torch.randn(n, generator=g) * 2.0  # the differences vary along w around a shift v
    negative = torch.randn(n, d, generator=g)
    positive = negative + v + t[:, None] * w + 0.01 * torch.randn(n, d, generator=g)
    centred = V.pca_of_differences(positive, negative, k=1, center=True)
    assert abs(F.cosine_similarity(centred.components[0], w, dim=0)) > 0.999
    # Per "layer" inputs give one set of components per layer.
    stacked = V.pca_of_differences(torch.stack([positive, -positive], 1),
                                   torch.stack([negative, -negative], 1), k=1)
    assert stacked.components.shape == (2, 1, d)


@pytest.mark.unchecked
def test_pca_of_differences_rejects_unpaired_rows():
    with pytest.raises(ValueError, match="paired rows"):
        V.pca_of_differences(torch.zeros(12, 4), torch.zeros(10, 4))


def test_probe_direction_maps_a_standardised_probe_back_to_raw_space():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    n, d = 400, 10
    scales = rng.uniform(0.2, 5.0, d)
    x = rng.normal(size=(n, d)) * scales + rng.normal(size=d) * 3
    z = (x - x.mean(0)) / scales
    y = (z[:, 0] - z[:, 3] + 0.3 * rng.normal(size=n) > 0).astype(int)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    w = V.probe_direction(pipe).double().numpy()
    # The decision function is affine in x with raw-space weights w: its differences between
    # any two inputs are the projections of their difference on w.
    scores = pipe.decision_function(x)
    assert np.allclose(scores[1:] - scores[0], (x[1:] - x[0]) @ w, atol=1e-4)
    # Plain estimators, nn.Linear, tensors.
    lr = LogisticRegression(max_iter=2000).fit(x, y)
    assert np.allclose(V.probe_direction(lr).numpy(), lr.coef_[0], atol=1e-6)
    lin = torch.nn.Linear(d, 1)
    assert torch.equal(V.probe_direction(lin), lin.weight[0].detach())
    assert V.probe_direction(torch.ones(1, d)).shape == (d,)
    assert V.probe_direction([lr, lr]).shape == (2, d)
    with pytest.raises(ValueError, match="multi-class"):
        V.probe_direction(LogisticRegression(max_iter=500).fit(x, rng.integers(0, 3, n)))
    with pytest.raises(ValueError, match="cannot read a direction"):
        V.probe_direction(object())


# --------------------------------------------------------------------------------------------
# Comparing directions
# --------------------------------------------------------------------------------------------


def test_cosine_matrix_against_pairwise_cosines():
    g = _gen(4)
    a, b = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g)
    a[2] = -2.5 * a[0]  # layer 2 of a points against layer 0
    m = V.cosine_matrix({"a": a, "b": b, "c": b[1]})
    rows = [a[0], a[1], a[2], b[0], b[1], b[2], b[1]]
    expected = torch.tensor([[F.cosine_similarity(r, s, dim=0).item() for s in rows] for r in rows])
    assert torch.allclose(m.values, expected, atol=1e-6)
    assert m.labels == ["a@L0", "a@L1", "a@L2", "b@L0", "b@L1", "b@L2", "c"]
    assert m.values[0, 2] == pytest.approx(-1.0, abs=1e-6) and m.values[4, 6] == pytest.approx(1.0)
    only = V.cosine_matrix({"a": a, "b": b}, layers=[1])
    assert only.keys == [("a", 1), ("b", 1)]
    by_layer = V.cosine_by_layer({"a": a, "b": b})
    assert by_layer.shape == (3, 2, 2)
    expected_cos = F.cosine_similarity(a[1], b[1], dim=0).item()
    assert by_layer[1, 0, 1] == pytest.approx(expected_cos, abs=1e-6)
    with pytest.raises(ValueError, match="different sizes"):
        V.cosine_matrix({"a": a, "x": torch.ones(5)})


def test_project_is_the_scalar_projection_on_the_unit_direction():
    g = _gen(5)
    x, d = torch.randn(4, 7, 9, generator=g), torch.randn(9, generator=g) * 3
    assert torch.allclose(V.project(x, d), (x * (d / d.norm())).sum(-1), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Steering, ablation and generation on a model
# --------------------------------------------------------------------------------------------


def _resid(model, tokens, layer, fwd_hooks=()):
    """resid_pre of `layer` with plain TransformerLens hook functions (independent of interp)."""
    store = {}

    def keep(act, hook):
        store["x"] = act.clone()

    model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (f"blocks.{layer}.hook_resid_pre", keep)])
    return store["x"]


def test_steering_with_a_concept_vector_adds_exactly_scale_times_vector(model):
    tokens = torch.randint(0, 256, (2, 9), generator=_gen(6))
    g = _gen(7)
    vector = V.diff_of_means(torch.randn(20, model.cfg.d_model, generator=g) + 1.0,
                             torch.randn(20, model.cfg.d_model, generator=g))
    clean = _resid(model, tokens, 1)
    with hooks.steer(model, vector, layers=[1], positions=[2, 5], scale=3.0):
        steered = _resid(model, tokens, 1)
    expected = clean.clone()
    expected[:, [2, 5]] += 3.0 * vector
    assert torch.allclose(steered, expected, atol=1e-5)
    # The projection on the direction moves by scale * |v| at the steered positions only.
    moved = V.project(steered - clean, vector)
    expected_move = torch.full((2, 2), 3.0 * vector.norm().item())
    assert torch.allclose(moved[:, [2, 5]], expected_move, atol=1e-4)
    assert moved[:, [0, 1, 3, 4, 6, 7, 8]].abs().max() < 1e-5


def test_directional_ablation_leaves_no_component_and_keeps_the_orthogonal_part(model):
    tokens = torch.randint(0, 256, (2, 9), generator=_gen(8))
    d = torch.randn(model.cfg.d_model, generator=_gen(9))
    u = d / d.norm()
    with hooks.ablate_direction(model, d, layers=[1], hooks="resid_pre"):
        ablated = _resid(model, tokens, 1)
    clean = _resid(model, tokens, 1)
    expected = clean - (clean @ u)[..., None] * u
    assert torch.allclose(ablated, expected, atol=1e-5)
    assert V.project(ablated, d).abs().max() < 1e-5


def _greedy_reference(model, prompt, n, add=None):
    """Greedy decoding by full recomputation, one prompt at a time; `add = (layer, vector,
    start)` adds `vector` to resid_pre of `layer` at positions >= start (a plain TL hook)."""
    tokens = torch.tensor([prompt])
    for _ in range(n):
        fwd = []
        if add is not None:
            layer, vector, start = add

            def steer(act, hook, vector=vector, start=start):
                act = act.clone()
                act[:, start:] += vector
                return act

            fwd = [(f"blocks.{layer}.hook_resid_pre", steer)]
        nxt = model.run_with_hooks(tokens, fwd_hooks=fwd)[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return tokens[0, len(prompt):].tolist()


def test_generate_with_matches_greedy_recomputation_in_a_batch(model):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
    out = V.generate_with(model, prompts, max_new_tokens=5, batch_size=3)
    assert out.prompt_tokens == prompts and out.texts is None
    assert out.tokens == [_greedy_reference(model, p, 5) for p in prompts]
    # Stop tokens cut a row after the first one (which is kept).
    first = out.tokens[0][0]
    stopped = V.generate_with(model, prompts[:1], max_new_tokens=5, stop_tokens=[first])
    assert stopped.tokens == [[first]]


def test_inject_from_a_token_onward_during_generation(model):
    prompt = [3, 14, 15, 92, 65, 35, 89]
    vector = torch.randn(model.cfg.d_model, generator=_gen(10)) * 4
    start = 4  # inject from the fifth prompt token onward, generated tokens included
    with V.inject(model, vector, layers=[1], from_position=start):
        pass  # entering and leaving must not break anything
    out = V.generate_with(model, [prompt], hooks=V.inject(model, vector, layers=[1],
                                                         from_position=start), max_new_tokens=6)
    assert out.tokens[0] == _greedy_reference(model, prompt, 6, add=(1, vector, start))
    assert out.tokens[0] != _greedy_reference(model, prompt, 6)  # the injection matters here
    assert not model.hook_dict["blocks.1.hook_resid_pre"].fwd_hooks  # hooks were removed


def test_next_token_logits_of_padded_batches_equal_single_prompt_logits(model):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
    logits = V.next_token_logits(model, prompts, batch_size=2)
    expected = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
    assert torch.allclose(logits, expected, atol=1e-4)


def test_generate_with_text_prompts_and_chat_template(default_model):
    out = V.generate_with(default_model, "The capital of France is", max_new_tokens=3)
    assert "Paris" in out.text
    chat = V.generate_with(default_model, ["What is 2 + 2?"], chat=True, max_new_tokens=1)
    expected = default_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True)
    assert default_model.tokenizer.decode(chat.prompt_tokens[0]) == expected


# --------------------------------------------------------------------------------------------
# Weight orthogonalisation
# --------------------------------------------------------------------------------------------


def test_orthogonalised_weights_write_nothing_along_the_direction_and_match_ablation(model):
    tokens = torch.randint(0, 256, (3, 10), generator=_gen(11))
    d = torch.randn(model.cfg.d_model, generator=_gen(12))
    u = d / d.norm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clean = model(tokens)
    with hooks.ablate_direction(model, d):  # resid_pre, attn_out, mlp_out of every layer
        ablated = model(tokens)
    edit = V.orthogonalise_weights(model, d)
    try:
        logits, cache = model.run_with_cache(tokens)
        names = [n for n in cache.keys() if n.endswith(("resid_pre", "resid_mid", "resid_post",
                                                        "attn_out", "mlp_out", "hook_embed"))]
        assert len(names) >= 4 * model.cfg.n_layers
        for name in names:
            proj = cache[name] @ u
            assert proj.abs().max() < 1e-4 * cache[name].norm(dim=-1).max(), name
        assert torch.allclose(logits, ablated, atol=1e-4)
        assert (logits - clean).abs().max() > 1e-2  # the direction mattered
        # Every writing matrix is orthogonal to u; reading weights (W_U, W_Q...) are unchanged.
        for name in edit.originals:
            assert (dict(model.named_parameters())[name] @ u).abs().max() < 1e-5, name
        assert torch.equal(model.W_U, before["unembed.W_U"])
        assert torch.equal(model.blocks[0].attn.W_Q, before["blocks.0.attn.W_Q"])
    finally:
        edit.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(model(tokens), clean)


def test_orthogonalise_weights_as_a_context_manager_and_its_errors():
    model = load("tiny-gpt2")
    before = model.W_pos.clone()
    with V.orthogonalise_weights(model, torch.ones(model.cfg.d_model)) as edit:
        assert "pos_embed.W_pos" in edit.originals
        assert not torch.equal(model.W_pos, before)
    assert torch.equal(model.W_pos, before)
    with pytest.raises(ValueError, match="d_model=64"):
        V.orthogonalise_weights(model, torch.ones(5))
    model.cfg.use_normalization_before_and_after = True
    with pytest.raises(NotImplementedError, match="post-norms"):
        V.orthogonalise_weights(model, torch.ones(model.cfg.d_model))
