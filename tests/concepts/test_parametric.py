"""interp.concepts.parametric: projections, relatedness, the locator and trace metrics, checked
against hand computations and a tiny model with a planted concept vector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interp import edits, models
from interp.concepts import parametric as P

PLANT_LAYER, PLANT_INDEX = 1, 37
CONCEPT = list(range(100, 110))  # 10 planted token ids (d_model 64 separates that many)


@pytest.fixture
def model():
    return models.load("tiny-llama", device="cpu", processing=False)


def _numpy_top(model, v, k, final_norm=False):
    """Top-k ids by an independent computation: numpy scores, stable argsort."""
    x = v.detach().double().numpy()
    if final_norm:
        w = model.ln_final.w.detach().double().numpy()
        x = x / np.sqrt((x**2).mean() + model.cfg.eps) * w
    scores = x @ model.W_U.detach().double().numpy()
    return list(np.argsort(-scores, kind="stable")[:k])


def _planted_vector(model, tokens, steps=500):
    """A vector whose top-len(tokens) projection is exactly `tokens`: a logistic loss on every
    (inside, outside) score pair, minimised by Adam."""
    w_u = model.W_U.detach()
    inside = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    inside[tokens] = True
    v = torch.zeros(model.cfg.d_model, requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.1)
    for _ in range(steps):
        s = v @ w_u
        loss = torch.nn.functional.softplus(1.0 - (s[inside][:, None] - s[~inside][None, :])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    v = v.detach()
    assert set(_numpy_top(model, v, len(tokens))) == set(tokens), "planting failed"
    return v


def test_projection_matches_a_hand_computation(model):
    v = model.blocks[0].mlp.W_out[5].detach()
    assert P.top_tokens(model, v, 10).tolist() == _numpy_top(model, v, 10)
    assert P.top_tokens(model, v, 10, final_norm=True).tolist() == _numpy_top(model, v, 10, True)
    scores = P.project(model, v[None])
    manual = sum(v[i].double() * model.W_U[i].detach().double() for i in range(model.cfg.d_model))
    assert torch.allclose(scores[0].double(), manual, atol=1e-4)
    all_top = P.projection_top_tokens(model, k=7, chunk=50)
    assert all_top.shape == (2, model.cfg.d_mlp, 7)
    assert all_top[1, 60].tolist() == _numpy_top(model, model.blocks[1].mlp.W_out[60], 7)


def test_reference_relatedness_and_stop_words():
    text = {0: " the", 1: "Ġand", 2: " Warsaw", 3: "\u2581Polish", 4: ",", 5: "  ", 6: "Vistula"}
    ref = P.ConceptReference.from_token_ids([0, 1, 2, 2, 3, 4, 5], d_vocab=8,
                                            token_text=text.get, name="Poland")
    # 'the' and 'and' are stop words, '  ' is empty: kept are 2, 3 and ',' (not a stop word)
    assert torch.nonzero(ref.mask).flatten().tolist() == [2, 3, 4]
    assert ref.n_removed == 3 and ref.size == 3 and ref.chance == 3 / 8
    top = torch.tensor([[2, 3, 6, 7], [0, 1, 5, 7]])
    assert P.relatedness(top, ref).tolist() == [0.5, 0.0]  # exact in float32
    plain = P.ConceptReference.from_token_ids([0, 1], d_vocab=8)  # no token_text: keep all
    assert plain.size == 2


def test_projection_scores_p_values_by_hand():
    ref = P.ConceptReference.from_token_ids(range(10), d_vocab=100)  # chance 0.1
    other = P.ConceptReference.from_token_ids(range(10, 40), d_vocab=100)
    top = torch.tensor([[[0, 1, 2, 50, 60], [10, 11, 12, 13, 0]]])  # [1 layer, 2 vectors, k=5]
    s = P.projection_scores(top, ref, [other], alpha=0.05)
    assert s.relatedness.tolist() == [[pytest.approx(0.6), pytest.approx(0.2)]]
    # background: relatedness to `other`, floored at ref's chance 0.1
    assert s.background.tolist() == [[pytest.approx(0.1), pytest.approx(0.8)]]
    p0 = sum(math.comb(5, j) * 0.1**j * 0.9 ** (5 - j) for j in range(3, 6))   # P(X >= 3)
    p1 = sum(math.comb(5, j) * 0.8**j * 0.2 ** (5 - j) for j in range(1, 6))   # P(X >= 1)
    assert s.p_value[0, 0] == pytest.approx(p0, rel=1e-5)
    assert s.p_value[0, 1] == pytest.approx(p1, rel=1e-5)
    assert s.significant.tolist() == [[p0 * 2 < 0.05, False]]


def test_locator_finds_a_planted_concept_vector(model):
    torch.manual_seed(3)
    v = _planted_vector(model, CONCEPT)
    edits.set_value_vector(model, PLANT_LAYER, PLANT_INDEX, v)
    ref = P.ConceptReference.from_token_ids(CONCEPT, model.cfg.d_vocab, name="planted")
    others = [P.ConceptReference.from_token_ids(range(s, s + 10), model.cfg.d_vocab)
              for s in (0, 200)]
    found = P.locate(model, ref, others, k=10)
    assert found.top_by_projection(1) == [(PLANT_LAYER, PLANT_INDEX)]
    assert found.row(PLANT_LAYER, PLANT_INDEX)["relatedness"] == 1.0
    assert found.n_significant() == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_locator_finds_nothing_in_a_random_model(seed):
    model = models.load("tiny-llama", device="cpu", processing=False, seed=seed)
    ref = P.ConceptReference.from_token_ids(CONCEPT, model.cfg.d_vocab)
    found = P.locate(model, ref, k=10)
    assert found.n_significant() == 0
    assert found.top_by_projection(3) == []
    assert float(found.projection.relatedness.max()) < 0.5


def test_activation_scores_match_a_manual_forward(model):
    gen = torch.Generator().manual_seed(0)
    with_c = [torch.randint(100, 120, (9,), generator=gen).tolist() for _ in range(3)]
    without = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (6, 8, 7)]
    s = P.activation_scores(model, with_c, without)

    def means(texts, layer):
        rows = []
        for t in texts:
            _, cache = model.run_with_cache(torch.tensor([t]))
            rows.append(cache[f"blocks.{layer}.mlp.hook_post"][0].mean(0))
        return torch.stack(rows)

    for layer in (0, 1):
        a, b = means(with_c, layer), means(without, layer)
        diff = a.mean(0) - b.mean(0)
        t = diff / (a.var(0) / 3 + b.var(0) / 3).sqrt()
        assert torch.allclose(s.diff[layer], diff, atol=1e-5)
        assert torch.allclose(s.t[layer], t, atol=1e-3, rtol=1e-3)


def test_causal_validation_keeps_the_vector_whose_noise_hurts_the_concept(model):
    original = edits.value_vector(model, 1, 3).clone()

    def score(m):  # target similarity falls as vector (1, 3) moves; unrelated stays
        moved = float((edits.value_vector(m, 1, 3) - original).norm() / original.norm())
        return max(0.0, 1.0 - moved), 0.95

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = P.causal_validation(model, [(0, 8), (1, 3)], score, sigmas=(0.1, 1.0))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored"
    assert len(rows) == 4
    median = float(model.blocks[1].mlp.W_out.detach().norm(dim=-1).median())
    row = next(r for r in rows if (r.layer, r.index, r.sigma) == (1, 3, 1.0))
    assert row.std == pytest.approx(median / math.sqrt(model.cfg.d_model), rel=1e-5)
    assert row.gap == pytest.approx(row.unrelated - row.target)
    assert [r.target for r in rows if r.layer == 0] == [1.0, 1.0]
    assert P.best_validated(rows, min_gap=0.1) == (1, 3)
    assert P.best_validated([r for r in rows if r.layer == 0], min_gap=0.1) is None


def test_trace_metrics_by_hand(model):
    v = model.blocks[0].mlp.W_out[2].detach()
    w = model.blocks[0].mlp.W_out[9].detach()
    after = v + 0.5 * w
    k = 30
    tb, ta = set(_numpy_top(model, v, k)), set(_numpy_top(model, after, k))
    ref_ids = sorted(tb)[:12] + [int(i) for i in range(256) if i not in tb][:5]
    ref = P.ConceptReference.from_token_ids(ref_ids, model.cfg.d_vocab)
    tr = P.trace_metrics(v, after, model, ref, k=k)
    cos = float(v.double() @ after.double() / (v.double().norm() * after.double().norm()))
    assert tr.cosine == pytest.approx(cos, abs=1e-6)
    assert tr.l2 == pytest.approx(float((0.5 * w).norm()), rel=1e-6)
    assert tr.jaccard == pytest.approx(len(tb & ta) / len(tb | ta))
    rb = tb & set(ref_ids)
    assert tr.n_related_before == len(rb) == 12
    assert tr.related_retention == pytest.approx(len(ta & rb) / 12)
    assert tr.related_ratio == pytest.approx(len(ta & set(ref_ids)) / 12)
    same = P.trace_metrics(v, v.clone(), model, ref, k=k)
    assert (same.cosine, same.l2, same.jaccard, same.related_retention) == (1.0, 0.0, 1.0, 1.0)
    assert math.isnan(P.trace_metrics(v, after, model, None, k=k).related_retention)


def test_vector_change_share_by_hand(model):
    before = P.parameter_snapshot(model)
    with torch.no_grad():
        model.blocks[1].mlp.W_out[4] += 3.0 / math.sqrt(model.cfg.d_model)  # ||dv||^2 = 9
        model.blocks[0].attn.W_Q[0, 0, :4] += 2.0                            # 4 * 4 = 16
    s = P.vector_change_share(before, model, 1, 4)
    assert s["vector_sq"] == pytest.approx(9.0, rel=1e-4)
    assert s["total_sq"] == pytest.approx(25.0, rel=1e-4)
    assert s["share"] == pytest.approx(9 / 25, rel=1e-4)
    assert math.isnan(P.vector_change_share(P.parameter_snapshot(model), model, 1, 4)["share"])


def test_clear_errors(model):
    with pytest.raises(ValueError, match="d_model"):
        P.project(model, torch.zeros(5))
    with pytest.raises(ValueError, match="no tokenizer"):
        P.ConceptReference.from_text(model, "hello")
    with pytest.raises(ValueError, match="at least 2"):
        P.activation_scores(model, [[1, 2]], [[3, 4], [5, 6]])
