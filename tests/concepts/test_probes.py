"""Layer-wise probes: a planted direction is found, shuffled labels stay at chance, the split is
seeded, and the decodable depth follows its definition on hand-made curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.concepts.probes import decodable_depth, layer_probes, probe_split


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
