"""Domain concept vectors, similarity and the Spearman test, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from interp import models
from interp.concepts import domain_vectors as V


@pytest.fixture(scope="module")
def model():
    return models.load("tiny-llama", device="cpu")


def _prompts(seed: int, n: int, lengths=(5, 7, 6)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (lengths[i % len(lengths)],), generator=gen).tolist()
            for i in range(n)]


def _plain_last_means(model, prompts):
    """One unpadded run_with_cache per prompt, resid_pre at its last token, averaged."""
    rows = []
    for p in prompts:
        _, cache = model.run_with_cache(torch.tensor([p]))
        rows.append(torch.stack([cache[f"blocks.{layer}.hook_resid_pre"][0, -1]
                                 for layer in range(model.cfg.n_layers)]))
    return torch.stack(rows).mean(0)


def test_domain_vectors_are_differences_of_plain_last_token_means(model):
    doms = {"a": _prompts(1, 4), "b": _prompts(2, 3)}
    harmless = _prompts(3, 5)
    vecs = V.domain_vectors(model, doms, harmless, batch_size=2)
    base = _plain_last_means(model, harmless)
    for d, p in doms.items():
        want = _plain_last_means(model, p) - base
        assert vecs[d].shape == (model.cfg.n_layers, model.cfg.d_model)
        torch.testing.assert_close(vecs[d], want, atol=1e-4, rtol=1e-4)


def test_similarity_matches_hand_cosines():
    gen = torch.Generator().manual_seed(0)
    vecs = {k: torch.randn(3, 8, generator=gen) for k in "xyz"}
    sim = V.similarity_by_layer(vecs)
    assert sim.shape == (3, 3, 3)
    for layer in range(3):
        for i, a in enumerate("xyz"):
            for j, b in enumerate("xyz"):
                u, v = vecs[a][layer], vecs[b][layer]
                hand = float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))
                assert float(sim[layer, i, j]) == pytest.approx(hand, abs=1e-6)
    to_z = V.similarity_to_target(sim, list("xyz"), "z", [0, 2])
    assert set(to_z) == {"x", "y"}
    assert to_z["x"] == pytest.approx(float(sim[0, 0, 2] + sim[2, 0, 2]) / 2, abs=1e-6)


def test_spearman_matches_the_rank_formula():
    sim = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.9, "e": 0.2}
    drop = {"a": 0.0, "b": 0.2, "c": 0.4, "d": 0.6, "e": 0.1, "t": 1.0}  # t not in sim: ignored
    out = V.similarity_drop_correlation(sim, drop)
    # ranks (no ties): sim a1 e2 c3 b4 d5; drop a1 e2 b3 c4 d5: d^2 = 1 + 1 -> rho = 1 - 6*2/(5*24)
    assert out["n"] == 5
    assert out["rho"] == pytest.approx(1 - 6 * 2 / (5 * 24))
    assert 0 < out["p"] < 1
    flat = V.similarity_drop_correlation(sim, {k: 0.0 for k in sim})
    assert flat["rho"] is None and flat["n"] == 5


def test_layer_bands():
    assert V.layer_band(30, "early") == list(range(1, 11))
    assert V.layer_band(30, "late") == list(range(20, 30))
    assert V.layer_band(18, "early") == list(range(1, 7))
    assert V.layer_band(4, [3, 1, 1]) == [1, 3]
    with pytest.raises(ValueError, match="not in range"):
        V.layer_band(4, [4])


@pytest.mark.unchecked
def test_unknown_band_is_named():
    with pytest.raises(ValueError, match="band must be"):
        V.layer_band(4, "middle")


def test_projections_match_a_hand_dot_product(model):
    doms = {"a": _prompts(4, 3)}
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    got = V.projections(model, doms, direction, layer=1)
    acts = torch.stack([model.run_with_cache(torch.tensor([p]))[1]["blocks.1.hook_resid_pre"][0, -1]
                        for p in doms["a"]])
    hand = float((acts @ (direction / direction.norm())).mean())
    assert got["a"] == pytest.approx(hand, abs=1e-4)


def test_bad_inputs_say_what_is_wrong(model):
    with pytest.raises(ValueError, match="harmless"):
        V.domain_vectors(model, {"a": _prompts(1, 2)}, [])
    with pytest.raises(ValueError, match="without prompts"):
        V.domain_vectors(model, {"a": []}, _prompts(1, 2))
    with pytest.raises(ValueError, match="not one of the domains"):
        V.similarity_to_target(torch.zeros(1, 2, 2), ["a", "b"], "c", [0])
