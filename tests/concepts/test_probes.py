"""Layer-wise probes: a planted direction is found, shuffled labels stay at chance, the split is
seeded, and the decodable depth follows its definition on hand-made curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.concepts.probes import (
    ProbeResults,
    decodable_depth,
    depth_range,
    layer_probes,
    probe_split,
    standard_errors,
)


def _planted(n=300, d=48, seed=0):
    """Layer 0: noise only. Layer 1: a weak planted direction. Layer 2: a strong one."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    direction = torch.randn(d, generator=gen)
    direction /= direction.norm()
    sign = (2 * y - 1).float()[:, None]
    layers = {0: torch.randn(n, d, generator=gen),
              1: torch.randn(n, d, generator=gen) + 0.4 * sign * direction,
              2: torch.randn(n, d, generator=gen) + 4.0 * sign * direction}
    return layers, y


def test_probe_recovers_a_planted_direction():
    features, y = _planted()
    res = layer_probes(features, y, test_fraction=0.25, seed=0)
    acc = dict(zip(res.layers, res.accuracy))
    auc = dict(zip(res.layers, res.auc))
    assert acc[2] >= 0.97 and auc[2] >= 0.99 and res.f1[2] >= 0.97
    assert acc[0] <= 0.65  # noise: no better than chance (n_test = 75)
    assert acc[1] < acc[2]
    assert res.best_layer == 2
    assert res.split["kind"] == "holdout" and res.split["n_test"] == 75
    assert 0.4 <= res.chance <= 0.6


def test_shuffled_labels_stay_at_chance():
    features, y = _planted()
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))]
    res = layer_probes(features, shuffled, cv_folds=5, seed=0)
    for acc, auc in zip(res.accuracy, res.auc):
        assert 0.38 <= acc <= 0.62 and 0.38 <= auc <= 0.62
    assert res.accuracy_std is not None and len(res.accuracy_std) == 3


def test_cross_validation_predicts_every_example_once_and_is_seeded():
    _, y = _planted()
    folds = probe_split(y, cv_folds=5, seed=1)
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested.tolist()) == list(range(len(y)))
    for train, test in folds:
        assert not set(train) & set(test)
        assert abs(y[test].float().mean() - y.float().mean()) < 0.05  # stratified
    again = probe_split(y, cv_folds=5, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = probe_split(y, cv_folds=5, seed=2)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))
    features, _ = _planted()
    a = layer_probes(features, y, cv_folds=5, seed=1)
    b = layer_probes(features, y, cv_folds=5, seed=1)
    assert a.accuracy == b.accuracy and a.auc == b.auc


def test_decodable_depth_follows_its_definition():
    curve = [0.5, 0.55, 0.8, 0.95, 1.0, 0.98]
    d = decodable_depth(curve, chance=0.5, fraction=0.9)
    assert d.threshold == pytest.approx(0.95) and d.layer == 3 and d.relative == pytest.approx(3 / 5)
    assert d.best_layer == 4 and d.best_accuracy == 1.0
    assert decodable_depth(curve, chance=0.5, fraction=1.0).layer == 4
    assert decodable_depth(curve, chance=0.5, fraction=0.5).layer == 2  # 0.8 >= 0.75
    assert decodable_depth(curve, n_layers=10).relative == pytest.approx(0.3)
    assert decodable_depth({3: 0.9, 1: 0.6, 2: 0.85}, chance=0.5, fraction=0.8).layer == 2
    flat = decodable_depth([0.5, 0.52, 0.51], chance=0.5)
    assert flat.layer is None and flat.relative is None
    with pytest.raises(ValueError, match="fraction"):
        decodable_depth(curve, fraction=0)
    with pytest.raises(ValueError, match="NaN"):
        decodable_depth([0.5, float("nan")])


def test_depth_range_brackets_the_strict_depth_by_hand():
    # chance 0.5, best 0.85 at layer 7: threshold 0.5 + 0.9 * 0.35 = 0.815. Strict depth: the
    # first accuracy >= 0.815 is layer 4 (0.82). With se 0.02: within one se of reaching it
    # (acc + 0.02 >= 0.815) first at layer 3 (0.80); clearly above it (acc - 0.02 >= 0.815)
    # first at layer 6 (0.84), since 0.82 - 0.02 = 0.80 at layer 4 is not.
    curve = [0.50, 0.60, 0.70, 0.80, 0.82, 0.78, 0.84, 0.85]
    r = depth_range(curve, [0.02] * 8, chance=0.5)
    assert r.threshold == pytest.approx(0.815)
    assert (r.low, r.depth, r.high) == (3, 4, 6)
    assert r.low_relative == pytest.approx(3 / 7) and r.high_relative == pytest.approx(6 / 7)
    assert r.depth == decodable_depth(curve, chance=0.5).layer
    assert (depth_range(curve, [0.02] * 8, z=0).low, depth_range(curve, [0.02] * 8, z=0).high) == (4, 4)
    wide = depth_range(curve, [0.06] * 8)  # no layer is 0.06 above 0.815: high is the best layer
    assert (wide.low, wide.depth, wide.high) == (3, 4, 7)
    # Per-layer errors count per layer: a sure layer 3 is not within reach.
    assert depth_range(curve, [0.02, 0.02, 0.02, 0.0, 0.02, 0.02, 0.02, 0.02]).low == 4
    # The SmolLM2 cities case in small: 0.760 against a threshold of 0.761 is one se away.
    smol = depth_range([0.5, 0.76, 0.70, 0.79], [0.0, 0.015, 0.015, 0.015], chance=0.5)
    assert smol.threshold == pytest.approx(0.761) and (smol.low, smol.depth, smol.high) == (1, 3, 3)
    assert depth_range({2: 0.8, 0: 0.5, 1: 0.79}, {0: 0.0, 1: 0.01, 2: 0.01}).low == 1
    flat = depth_range([0.5, 0.52, 0.51], [0.01] * 3)
    assert flat.depth is None and flat.low is None and flat.high is None
    with pytest.raises(ValueError, match="standard errors"):
        depth_range(curve, [0.02] * 7)
    with pytest.raises(ValueError, match=">= 0"):
        depth_range(curve, [-0.02] * 8)


def test_standard_errors_from_stored_results():
    assert standard_errors([0.7, 0.8], [0.04, 0.0], {"kind": "cv", "folds": 5}) == pytest.approx([0.02, 0.0])
    assert standard_errors([0.8], None, {"kind": "holdout", "n_test": 100}) == pytest.approx([0.04])
    res = ProbeResults(layers=[0, 1, 2], accuracy=[0.5, 0.8, 0.9], f1=[0.0] * 3, auc=[0.5] * 3,
                       chance=0.5, n_examples=200, split={"kind": "cv", "folds": 5, "seed": 0},
                       C=1.0, n_layers=2, accuracy_std=[0.0, 0.2, 0.02])
    r = res.depth_range()  # threshold 0.86; se 0.1 at layer 1 puts it within reach
    assert (r.low, r.depth, r.high) == (1, 2, 2) and r.high_relative == 1.0


def test_bad_labels_and_shapes_are_errors():
    features, y = _planted(n=40)
    with pytest.raises(ValueError, match="binary 0/1"):
        layer_probes(features, y + 1)
    with pytest.raises(ValueError, match="one class"):
        layer_probes(features, torch.zeros(40, dtype=torch.long))
    with pytest.raises(ValueError, match="rows but there are"):
        layer_probes({0: features[0][:30]}, y)
    with pytest.raises(ValueError, match="cv_folds"):
        layer_probes(features, y, cv_folds=1)
