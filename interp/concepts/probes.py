"""Layer-wise linear probes, and the depth at which a concept becomes linearly decodable.

A probe is an L2-regularised logistic regression (scikit-learn, lbfgs, fixed `max_iter`) on the
activations of one layer, standardised with the mean and scale of the *training* rows. Every
layer uses the same seeded split, so the curves over layers compare like with like:

- **hold-out** (default): one stratified split, `test_fraction` of the examples held out;
- **cross-validation** (`cv_folds=k`): stratified k-fold with shuffling; each example is
  predicted once by the probe that did not see it, and accuracy, F1 and AUC are computed over
  all these out-of-fold predictions together (more stable than averaging fold scores on small
  sets); the spread of the per-fold accuracies is reported as `accuracy_std`.

Accuracy, F1 of the positive class (label 1) and ROC AUC (from predicted probabilities) are
reported per layer, with `chance`, the majority-class rate of the evaluated labels (what a
constant classifier gets).

**Where a concept becomes decodable** (`decodable_depth`). Following the accuracy-curve analysis
of "Exploring Concept Depth" (Jin et al. 2024, arXiv 2404.07066), which reads per-layer probe
accuracy curves of several LLMs and calls concepts whose accuracy saturates in early layers
"shallow" and those that need deeper layers "deep", we make the reading precise:

    best      = max over layers of accuracy
    threshold = chance + fraction * (best - chance)          (fraction = 0.9 by default)
    depth     = the first layer whose accuracy >= threshold
    relative  = depth / n_layers

i.e. the first layer that has gained `fraction` of the best layer's gain over chance. With
`chance=0` this is "the first layer reaching `fraction` of the best accuracy". When the best
layer is less than `min_gain` above chance, the concept is reported as not decodable
(`layer=None`). Layer numbering is the caller's: the `concept-depth` study keys its features by
*blocks applied* (0 = the embeddings, `k` = the residual stream after block `k`), so
`relative = k / n_layers` is the fraction of the network's blocks a concept needs. Caveats: the
first-crossing rule is sensitive to noise in the curve (a lucky early layer counts, an unlucky
one does not); use enough test examples (cross-validation helps) and read the curve, not only
the number. A linear probe finding a direction does not show that the model uses it.

**How sure the depth is** (`depth_range`). The strict depth can jump many layers on a difference
of less than one example: on a plateau whose accuracies sit near the threshold, whichever layer
happens to land just above it wins. `depth_range` keeps the strict depth as defined above and
adds the layers between which it could plausibly lie, given each layer's standard error `se`
(`z` standard errors, default one):

    low   = the first layer whose accuracy + z * se >= threshold   (within z se of reaching it)
    high  = the first layer whose accuracy - z * se >= threshold   (beyond z se above it),
            or the best layer if that comes first (the threshold is defined by it)
    low <= depth <= high

A narrow range means the depth is well placed; a wide one, that the curve hovers near the
threshold for those layers. For cross-validated probes `se` is the standard error of the mean
fold accuracy, `accuracy_std / sqrt(folds - 1)` (`accuracy_std` is the population spread of the
fold accuracies; this equals the sample standard deviation over sqrt(folds)); for one hold-out
split, the binomial `sqrt(acc * (1 - acc) / n_test)` (`ProbeResults.standard_errors`). The
threshold's own noise (it comes from the best of many noisy layers) is not included.

**Speed.** Probes are small problems (hundreds of rows, ~1,000 features); BLAS threading costs
more in synchronisation than it gains there (10x more CPU time per lbfgs fit, measured on a
shared 2-core machine), so BLAS is limited to one thread while probes are fitted
(`threadpoolctl`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Union

import numpy as np
from jaxtyping import Float
from torch import Tensor

__all__ = ["Depth", "DepthRange", "ProbeResults", "decodable_depth", "depth_range",
           "layer_probes", "probe_split", "standard_errors"]

Features = Union[Float[Tensor, "n d"], np.ndarray]


class Depth(NamedTuple):
    """Where a concept becomes decodable (see the module docstring).

    Attributes:
        layer: the first layer at or above `threshold`; None when not decodable.
        relative: `layer / n_layers`; None when not decodable.
        threshold: `chance + fraction * (best_accuracy - chance)`.
        best_layer: the layer with the highest accuracy (the first one on ties).
        best_accuracy: its accuracy.
        chance: the accuracy of a constant classifier.
        fraction: the fraction of the best gain over chance that counts as decodable.
        n_layers: the denominator of `relative`.
    """

    layer: int | None
    relative: float | None
    threshold: float
    best_layer: int
    best_accuracy: float
    chance: float
    fraction: float
    n_layers: int


def decodable_depth(
    accuracies: Sequence[float] | Mapping[int, float],
    layers: Sequence[int] | None = None,
    n_layers: int | None = None,
    fraction: float = 0.9,
    chance: float = 0.5,
    min_gain: float = 0.05,
) -> Depth:
    """The first layer whose accuracy reaches `chance + fraction * (best - chance)`.

    Args:
        accuracies: accuracy per layer, as a sequence (with `layers`, default 0, 1, ...) or a
            mapping `{layer: accuracy}`; layers are scanned in increasing order.
        layers: the layer number of each accuracy.
        n_layers: denominator of the relative depth (default: the largest layer number).
        fraction: in (0, 1]; 1 means "the first layer as good as the best".
        chance: accuracy of a constant classifier (0.5 for balanced labels).
        min_gain: below `best - chance < min_gain` the concept counts as not decodable.

    Raises:
        ValueError: empty or mismatched inputs, NaN accuracies, `fraction` outside (0, 1].
    """
    if isinstance(accuracies, Mapping):
        if layers is not None:
            raise ValueError("pass layers either as the mapping's keys or as layers=, not both")
        layers, values = list(accuracies), [float(v) for v in accuracies.values()]
    else:
        values = [float(v) for v in accuracies]
        layers = list(range(len(values))) if layers is None else [int(l) for l in layers]
    if not values:
        raise ValueError("no accuracies given")
    if len(layers) != len(values):
        raise ValueError(f"{len(layers)} layers but {len(values)} accuracies")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"accuracies contain NaN: {values}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    pairs = sorted(zip(layers, values))
    best_layer, best = max(pairs, key=lambda p: (p[1], -p[0]))
    n_layers = n_layers if n_layers is not None else max(max(layers), 1)
    threshold = chance + fraction * (best - chance)
    layer = None
    if best - chance >= min_gain:
        layer = next(l for l, v in pairs if v >= threshold - 1e-12)
    return Depth(layer=layer, relative=None if layer is None else layer / n_layers,
                 threshold=threshold, best_layer=best_layer, best_accuracy=best, chance=chance,
                 fraction=fraction, n_layers=n_layers)


class DepthRange(NamedTuple):
    """The layers between which the decodable depth plausibly lies (see the module docstring).

    Attributes:
        depth: the strict decodable depth (`decodable_depth(...).layer`); None when not decodable.
        low: the first layer whose accuracy is within `z` standard errors of the threshold (or
            above it); None when not decodable.
        high: the first layer whose accuracy is more than `z` standard errors above the
            threshold, or the best layer if that comes first; None when not decodable.
        low_relative, high_relative: `low / n_layers`, `high / n_layers`.
        threshold: as in `Depth`.
        z: the number of standard errors.
        n_layers: the denominator of the relative depths.
    """

    depth: int | None
    low: int | None
    high: int | None
    low_relative: float | None
    high_relative: float | None
    threshold: float
    z: float
    n_layers: int


def depth_range(
    accuracies: Sequence[float] | Mapping[int, float],
    standard_errors: Sequence[float] | Mapping[int, float],
    layers: Sequence[int] | None = None,
    n_layers: int | None = None,
    fraction: float = 0.9,
    chance: float = 0.5,
    min_gain: float = 0.05,
    z: float = 1.0,
) -> DepthRange:
    """`decodable_depth` with the range of layers it could plausibly fall on (module docstring).

    Args:
        accuracies: accuracy per layer, a sequence (with `layers`) or `{layer: accuracy}`.
        standard_errors: the standard error of each accuracy, in the same form (e.g.
            `ProbeResults.standard_errors()`), >= 0.
        layers, n_layers, fraction, chance, min_gain: as in `decodable_depth` (the threshold
            and the strict depth are the same).
        z: how many standard errors count as "within reach" of the threshold; 0 gives
            `low == high == depth`.

    Raises:
        ValueError: as `decodable_depth`; errors of another length, negative or NaN; `z < 0`.
    """
    if isinstance(accuracies, Mapping):
        if layers is not None or not isinstance(standard_errors, Mapping):
            raise ValueError("with accuracies as a mapping, pass standard_errors as a mapping "
                             "with the same layers and no layers=")
        if set(standard_errors) != set(accuracies):
            raise ValueError("standard_errors and accuracies have different layers")
        layers = list(accuracies)
        standard_errors = [standard_errors[l] for l in layers]
        accuracies = [accuracies[l] for l in layers]
    strict = decodable_depth(accuracies, layers, n_layers, fraction=fraction, chance=chance,
                             min_gain=min_gain)
    values = [float(v) for v in accuracies]
    errors = [float(e) for e in standard_errors]
    layers = list(range(len(values))) if layers is None else [int(l) for l in layers]
    if len(errors) != len(values):
        raise ValueError(f"{len(errors)} standard errors but {len(values)} accuracies")
    if any(math.isnan(e) or e < 0 for e in errors):
        raise ValueError(f"standard errors must be >= 0, got {errors}")
    if z < 0:
        raise ValueError(f"z must be >= 0, got {z}")
    low = high = None
    if strict.layer is not None:
        rows = sorted(zip(layers, values, errors))
        t = strict.threshold - 1e-12
        low = next(l for l, v, e in rows if v + z * e >= t)
        high = next((l for l, v, e in rows if v - z * e >= t), strict.best_layer)
        high = min(high, strict.best_layer)
    n = strict.n_layers
    return DepthRange(depth=strict.layer, low=low, high=high,
                      low_relative=None if low is None else low / n,
                      high_relative=None if high is None else high / n,
                      threshold=strict.threshold, z=z, n_layers=n)


@dataclass
class ProbeResults:
    """Probe metrics per layer.

    Attributes:
        layers: layer numbers, increasing.
        accuracy, f1, auc: one value per layer (hold-out or pooled out-of-fold, see module).
        accuracy_std: spread of the per-fold accuracies (cross-validation only).
        chance: majority-class rate of the evaluated labels.
        n_examples: rows used.
        split: how examples were split (`kind` "holdout" or "cv", seed, sizes).
        C: inverse L2 strength of the logistic regression.
        n_layers: denominator of relative depths (default: the largest layer number).
    """

    layers: list[int]
    accuracy: list[float]
    f1: list[float]
    auc: list[float]
    chance: float
    n_examples: int
    split: dict[str, Any]
    C: float
    n_layers: int
    accuracy_std: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def depth(self, fraction: float = 0.9, min_gain: float = 0.05) -> Depth:
        """`decodable_depth` of the accuracy curve, with this result's chance and n_layers."""
        return decodable_depth(self.accuracy, self.layers, self.n_layers, fraction=fraction,
                               chance=self.chance, min_gain=min_gain)

    def standard_errors(self) -> list[float]:
        """Standard error of each layer's accuracy: `accuracy_std / sqrt(folds - 1)` for
        cross-validation (the sample spread of the fold accuracies over sqrt(folds)), else the
        binomial `sqrt(acc * (1 - acc) / n_test)` of the hold-out split."""
        return standard_errors(self.accuracy, self.accuracy_std, self.split)

    def depth_range(self, fraction: float = 0.9, min_gain: float = 0.05, z: float = 1.0) -> DepthRange:
        """`depth_range` of the accuracy curve with `standard_errors()`."""
        return depth_range(self.accuracy, self.standard_errors(), self.layers, self.n_layers,
                           fraction=fraction, chance=self.chance, min_gain=min_gain, z=z)

    @property
    def best_layer(self) -> int:
        return self.layers[int(np.argmax(self.accuracy))]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def standard_errors(accuracy: Sequence[float], accuracy_std: Sequence[float] | None,
                    split: Mapping[str, Any]) -> list[float]:
    """Per-layer standard errors of probe accuracies, from what `ProbeResults` stores (also as
    JSON): `split["kind"] == "cv"`: `accuracy_std / sqrt(folds - 1)`; "holdout": binomial
    `sqrt(acc * (1 - acc) / n_test)`."""
    if split.get("kind") == "cv":
        if accuracy_std is None:
            raise ValueError("cross-validated results without accuracy_std")
        folds = int(split["folds"])
        return [float(s) / math.sqrt(folds - 1) for s in accuracy_std]
    n = int(split["n_test"])
    return [math.sqrt(a * (1 - a) / n) for a in accuracy]


def _as_numpy(x: Features) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D [n, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x


def _binary_labels(labels: Any, n: int | None = None) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(
            f"labels must be binary 0/1, got values {sorted(values, key=str)[:10]}; map them "
            "to 0/1 first (interp.concepts.datasets does this for tables)"
        )
    if len(values) < 2:
        raise ValueError(f"labels have one class only ({values}); a probe needs both 0 and 1")
    if n is not None and len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} examples")
    return y.astype(np.int64)


def probe_split(labels: Any, test_fraction: float = 0.2, cv_folds: int | None = None,
                seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) index pairs `layer_probes` uses: one stratified hold-out split, or
    stratified k folds. A pure function of the labels, the fractions and the seed."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    y = _binary_labels(labels)
    index = np.arange(len(y))
    counts = np.bincount(y, minlength=2)
    if cv_folds is not None:
        if cv_folds < 2:
            raise ValueError(f"cv_folds must be >= 2, got {cv_folds}")
        if counts.min() < cv_folds:
            raise ValueError(f"cv_folds={cv_folds} needs at least {cv_folds} examples of each "
                             f"class; the labels have {counts.tolist()}")
        folds = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in folds.split(index, y)]
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = math.ceil(test_fraction * len(y))
    if counts.min() < 2 or n_test < 2 or len(y) - n_test < 2:
        raise ValueError(f"too few examples for a stratified split: classes {counts.tolist()}, "
                         f"test_fraction={test_fraction}")
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=y)
    return [(np.sort(train), np.sort(test))]


def layer_probes(
    features: Mapping[int, Features] | Sequence[Features],
    labels: Any,
    test_fraction: float = 0.2,
    cv_folds: int | None = None,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
    standardize: bool = True,
    n_layers: int | None = None,
) -> ProbeResults:
    """Fit one logistic-regression probe per layer and report accuracy, F1 and AUC per layer.

    Args:
        features: `{layer: [n, d] activations}` (e.g. `Activations.by_layer("resid_post")`) or
            a sequence (layers 0, 1, ...). Tensors or numpy arrays.
        labels: n binary labels (0/1).
        test_fraction: hold-out fraction (ignored with `cv_folds`).
        cv_folds: use stratified k-fold cross-validation instead of one hold-out split.
        seed: seed of the split (the same split for every layer) and of the solver.
        C: inverse L2 regularisation strength (scikit-learn's default 1.0, as in the Concept
            Depth code; smaller is stronger).
        max_iter: lbfgs iterations (a probe that has not converged is still scored; a
            ConvergenceWarning is issued by scikit-learn).
        standardize: z-score each feature with the training rows' mean and scale first.
        n_layers: denominator of relative depths (default: the largest layer number).

    Returns:
        `ProbeResults`.

    Raises:
        ValueError: labels that are not binary or of one class, feature shapes that differ in
            n from the labels, NaN features, too few examples for the split.
    """
    from threadpoolctl import threadpool_limits

    items = dict(features) if isinstance(features, Mapping) else dict(enumerate(features))
    if not items:
        raise ValueError("no features given")
    y = _binary_labels(labels)
    splits = probe_split(y, test_fraction, cv_folds, seed)
    evaluated = np.concatenate([te for _, te in splits])
    chance = float(max(y[evaluated].mean(), 1 - y[evaluated].mean()))
    layers = sorted(items)
    with threadpool_limits(limits=1):  # see the module docstring ("Speed")
        rows = [_fit_layer(items[layer], layer, y, splits, evaluated, C, max_iter, standardize, seed)
                for layer in layers]
    acc, f1, auc, acc_std = (list(col) for col in zip(*rows))
    if cv_folds is not None:
        split = {"kind": "cv", "folds": cv_folds, "seed": seed}
    else:
        split = {"kind": "holdout", "test_fraction": test_fraction, "seed": seed,
                 "n_train": int(len(splits[0][0])), "n_test": int(len(splits[0][1]))}
    return ProbeResults(
        layers=layers, accuracy=acc, f1=f1, auc=auc, chance=chance, n_examples=len(y),
        split=split, C=C, n_layers=n_layers if n_layers is not None else max(max(layers), 1),
        accuracy_std=acc_std if cv_folds is not None else None,
    )



def _fit_layer(features: Features, layer: int, y: np.ndarray,
               splits: list[tuple[np.ndarray, np.ndarray]], evaluated: np.ndarray, C: float,
               max_iter: int, standardize: bool, seed: int) -> tuple[float, float, float, float]:
    """Fit and score the probes of one layer: (accuracy, F1, AUC, std of fold accuracies)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = _as_numpy(features)
    if x.shape[0] != len(y):
        raise ValueError(f"layer {layer} has {x.shape[0]} rows but there are {len(y)} labels")
    prob = np.zeros(len(y))
    fold_acc = []
    for train, test in splits:
        steps = [StandardScaler()] if standardize else []
        clf = make_pipeline(*steps, LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
        clf.fit(x[train], y[train])
        prob[test] = clf.predict_proba(x[test])[:, 1]
        fold_acc.append(accuracy_score(y[test], prob[test] >= 0.5))
    pred = (prob[evaluated] >= 0.5).astype(np.int64)
    return (float(accuracy_score(y[evaluated], pred)),
            float(f1_score(y[evaluated], pred, zero_division=0.0)),
            float(roc_auc_score(y[evaluated], prob[evaluated])),
            float(np.std(fold_acc)))
