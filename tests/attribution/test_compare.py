"""Agreement statistics against scipy-free hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from interp.attribution.compare import agreement, pearson, ranks, spearman, top_k_overlap
from interp.attribution.sites import Scores


def test_pearson_and_spearman_known_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    # hand computed: x=[1,2,3,4], y=[1,3,2,5]: cov 3.5/4... r = 0.8315218
    assert pearson(x, torch.tensor([1.0, 3.0, 2.0, 5.0])) == pytest.approx(0.8315218, abs=1e-6)
    # monotone but non-linear: Spearman 1, Pearson < 1
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert pearson(x, x ** 3) < 0.99
    assert math.isnan(pearson(x, torch.ones(4)))


def test_ranks_average_ties():
    assert ranks(torch.tensor([10.0, 20.0, 10.0, 5.0])).tolist() == [1.5, 3.0, 1.5, 0.0]


def test_top_k_overlap_by_absolute_value():
    a = torch.tensor([5.0, -4.0, 0.1, 0.2, 3.0])
    b = torch.tensor([-6.0, 0.0, 0.1, 4.0, 3.0])
    assert top_k_overlap(a, b, 2) == 0.5  # {0,1} vs {0,3}
    assert top_k_overlap(a, b, 3) == 2 / 3  # {0,1,4} vs {0,3,4}


def test_agreement_checks_the_sites_line_up():
    s = Scores("resid", "atp", torch.randn(2, 3), ("layer", "pos"))
    t = Scores("resid", "exact", torch.randn(2, 4), ("layer", "pos"))
    with pytest.raises(ValueError, match=r"atp on resid \(2, 3\) with exact on resid \(2, 4\)"):
        agreement(s, t)
    result = agreement(s, Scores("resid", "exact", 2 * s.values, ("layer", "pos")), k=4)
    assert result.pearson == pytest.approx(1.0) and result.top_k == 1.0 and result.n_sites == 6
