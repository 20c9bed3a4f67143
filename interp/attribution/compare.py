"""Agreement of an attribution method with exact patching, per site family.

`agreement(method_scores, exact_scores)` gives Pearson r, Spearman rho and top-k overlap (the
fraction of the k sites with the largest |exact| effect that are also among the method's k
largest |scores|) over the flattened sites of one family. These are the numbers the RelP paper
reports (Pearson r with activation patching) plus two that are robust to outliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interp.attribution.sites import Scores


@dataclass(frozen=True)
class Agreement:
    """How closely one method's scores track exact patching over one family's sites.

    Attributes:
        pearson: Pearson correlation of the scores.
        spearman: Pearson correlation of their ranks (ties get their mean rank).
        top_k: |top-k(method) & top-k(exact)| / k, by absolute value.
        k: the k used.
        n_sites: number of sites compared.
    """

    pearson: float
    spearman: float
    top_k: float
    k: int
    n_sites: int


def pearson(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    """Pearson r; NaN when either side is constant (no variation to correlate)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return float("nan") if denom == 0 else float((x @ y) / denom)


def ranks(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks 0..n-1 with ties given their average rank."""
    order = torch.argsort(x, stable=True)
    r = torch.empty(len(x), dtype=torch.float64)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    if len(values) < len(x):  # average the ranks within each group of ties
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, r)
        counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
        r = (sums / counts)[inverse]
    return r


def spearman(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    return pearson(ranks(x), ranks(y))


def top_k_overlap(x: Float[Tensor, " n"], y: Float[Tensor, " n"], k: int) -> float:
    k = min(k, len(x))
    top_x = set(torch.topk(x.abs(), k).indices.tolist())
    top_y = set(torch.topk(y.abs(), k).indices.tolist())
    return len(top_x & top_y) / k


def agreement(method: Scores, exact: Scores, k: int = 10) -> Agreement:
    """Agreement of `method` with `exact` on the same family and sites. Scores that are
    magnitudes (`method.signed` false, e.g. GradDrop) are compared with `|exact|`."""
    if method.family != exact.family or method.values.shape != exact.values.shape:
        raise ValueError(
            f"cannot compare {method.method} on {method.family} {tuple(method.values.shape)} "
            f"with {exact.method} on {exact.family} {tuple(exact.values.shape)}: the sites differ"
        )
    x, y = method.flat(), exact.flat()
    if not method.signed:
        y = y.abs()
    return Agreement(pearson(x, y), spearman(x, y), top_k_overlap(x, y, k), min(k, len(x)), len(x))
