"""Concept vectors: directions in activation space, how to compare them, and how to use them.

A *concept vector* is a direction `v` in some activation space (usually the residual stream at
one layer) along which a concept is represented. This module builds them from activations
(collected with `interp.concepts.collect` or any `[n, ..., d]` tensors), compares them, and
intervenes with them:

- **Building.** `diff_of_means` (mean of the positive examples minus the mean of the negative
  ones; the workhorse of activation steering and of the refusal direction),
  `pca_of_differences` (principal directions of *paired* differences, as in representation
  engineering), `probe_direction` (the weight vector of a linear probe, mapped back to the raw
  activation space when the probe standardised its inputs).
- **Comparing.** `cosine_matrix` (every concept at every layer against every other) and
  `cosine_by_layer` (concepts against each other, one matrix per layer); `project` reads
  activations along a direction.
- **Intervening.** Steering and directional ablation are the hooks of `interp.hooks`
  (`steer`, `ablate_direction`); this module adds `inject` (steer from a token onward, for
  generation) and `orthogonalise_weights` (the weight-space form of directional ablation,
  undoable). Generation with hooks lives in `interp.generation` (`generate_with`,
  `next_token_logits`, ...); those names stay importable from here.

Caveats that apply to all of them: a direction is only meaningful relative to the activation
scale at its layer (residual norms grow with depth), so compare steering scales relative to
`x.norm(dim=-1)`; a difference of means also picks up every feature that is correlated with the
concept in the data set (length, topic, template); and cosine similarity between directions
of different layers compares coordinates of different spaces that happen to share a basis
(the residual stream), which is meaningful for residual-stream directions only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import einops
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from interp import edits as _edits
from interp import hooks as _hooks

# Generation moved to `interp.generation`; these names stay importable from here.
from interp.generation import (  # noqa: F401
    Generation,
    generate_with,
    left_pad,
    next_token_logits,
    pad_id,
    token_lists,
)
from interp.generation import pad_id as _pad_id  # noqa: F401  (the old private name)

__all__ = [
    "CosineMatrix",
    "Generation",
    "PCADirections",
    "WeightEdit",
    "cosine_by_layer",
    "cosine_matrix",
    "diff_of_means",
    "generate_with",
    "inject",
    "left_pad",
    "next_token_logits",
    "normalised_diff_of_means",
    "orthogonalise_weights",
    "pca_of_differences",
    "probe_direction",
    "project",
    "token_lists",
    "unit",
    "writing_parameters",
]



# --------------------------------------------------------------------------------------------
# Building directions
# --------------------------------------------------------------------------------------------


def _as_float_tensor(x: Any, what: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a tensor (or numpy array), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must hold floats, got dtype {x.dtype}")
    return x


def _check_examples(positive: Tensor, negative: Tensor) -> None:
    if positive.ndim < 2 or negative.ndim < 2:
        raise ValueError(
            "positive and negative must be [n_examples, ..., d] (examples on the first axis); "
            f"got shapes {tuple(positive.shape)} and {tuple(negative.shape)}"
        )
    if positive.shape[1:] != negative.shape[1:]:
        raise ValueError(
            f"positive {tuple(positive.shape)} and negative {tuple(negative.shape)} must agree "
            "on every axis after the first (the example axis)"
        )
    if positive.shape[0] == 0 or negative.shape[0] == 0:
        raise ValueError("positive and negative need at least one example each")


def diff_of_means(
    positive: Float[Tensor, "n_pos *rest d"], negative: Float[Tensor, "n_neg *rest d"]
) -> Float[Tensor, "*rest d"]:
    """Difference of means: `mean(positive) - mean(negative)` over the example axis.

    The simplest concept vector and, for steering, often the best one (Marks & Tegmark 2023,
    Arditi et al. 2024, Im & Li 2025): with two classes that differ by a shift `v`, the
    difference of class means is an unbiased estimate of `v`, whatever the within-class
    covariance (a probe's weight vector instead is `Sigma^-1 v`, which separates better but
    steers worse). It is *unnormalised*: its norm says how far apart the classes sit, which
    is the natural scale for steering with `scale=1` (adding it to a negative example moves it
    to the positive mean). Use `unit` or `normalised_diff_of_means` for a unit direction.

    The sets need not be the same size or paired. Any axes between the example axis and the
    last one (layers, positions) are kept, so `[n, layer, d]` activations give one vector per
    layer. Means are computed in float32 (or float64 if given).

    Args:
        positive: activations of examples that have the concept, `[n_pos, ..., d]`.
        negative: activations of examples that lack it, `[n_neg, ..., d]`.

    Returns:
        `[..., d]`, in float32 (float64 inputs stay float64).
    """
    positive = _as_float_tensor(positive, "positive")
    negative = _as_float_tensor(negative, "negative")
    _check_examples(positive, negative)
    dtype = torch.promote_types(torch.promote_types(positive.dtype, negative.dtype), torch.float32)
    return positive.to(dtype).mean(0) - negative.to(dtype).to(positive.device).mean(0)


def unit(vectors: Float[Tensor, "... d"], eps: float = 1e-12) -> Float[Tensor, "... d"]:
    """`vectors` scaled to unit norm along the last axis.

    Raises:
        ValueError: when a vector has norm below `eps` (it has no direction).
    """
    vectors = _as_float_tensor(vectors, "vectors")
    norms = vectors.norm(dim=-1, keepdim=True)
    if bool((norms < eps).any()):
        raise ValueError(
            "cannot normalise a (near-)zero vector: some vectors have norm < "
            f"{eps:g} (e.g. a difference of means between identical activations)"
        )
    return vectors / norms


def normalised_diff_of_means(
    positive: Float[Tensor, "n_pos *rest d"], negative: Float[Tensor, "n_neg *rest d"]
) -> Float[Tensor, "*rest d"]:
    """`unit(diff_of_means(positive, negative))`: the unit direction from negative to positive."""
    return unit(diff_of_means(positive, negative))


class PCADirections(NamedTuple):
    """Principal directions of paired differences (see `pca_of_differences`).

    Attributes:
        components: `[..., k, d]` unit vectors, the first the most important; each signed so
            that the mean difference projects positively on it (it points from negative to
            positive examples).
        explained: `[..., k]` fraction of the total (uncentred or centred, as asked) sum of
            squares of the differences along each component.
        mean_projection: `[..., k]` mean projection of the differences on each component.
    """

    components: Float[Tensor, "*rest k d"]
    explained: Float[Tensor, "*rest k"]
    mean_projection: Float[Tensor, "*rest k"]


def pca_of_differences(
    positive: Float[Tensor, "n *rest d"],
    negative: Float[Tensor, "n *rest d"],
    k: int = 1,
    center: bool = False,
) -> PCADirections:
    """Principal directions of the paired differences `positive[i] - negative[i]`.

    Representation engineering (Zou et al. 2023) reads a concept from contrast pairs: two
    inputs that differ only in the concept (a true and a false version of one statement, the
    same request phrased harmfully and harmlessly). Row `i` of `positive` and of `negative`
    must be such a pair. The differences cancel what the pair shares, and their top principal
    direction is the concept.

    By default the PCA is *uncentred* (an SVD of the difference matrix itself): the first
    component is the direction that captures the most squared difference, shared mean
    included, so with consistent pairs it is close to `unit(diff_of_means)`. With
    `center=True` the mean difference is removed first, and the components describe how the
    differences *vary* across pairs instead (useful to find a second factor; the concept
    itself then mostly disappears). Zou et al. flip the sign of random pairs before a centred
    PCA, which amounts to the uncentred form.

    Args:
        positive: `[n, ..., d]`, row i paired with row i of `negative`.
        negative: `[n, ..., d]`.
        k: number of components (at most min(n, d)).
        center: subtract the mean difference before the decomposition.

    Returns:
        A `PCADirections` with `[..., k, d]` components (one set per layer/position when the
        inputs have middle axes).
    """
    positive = _as_float_tensor(positive, "positive")
    negative = _as_float_tensor(negative, "negative")
    _check_examples(positive, negative)
    if positive.shape[0] != negative.shape[0]:
        raise ValueError(
            f"pca_of_differences needs paired rows: positive has {positive.shape[0]} examples, "
            f"negative {negative.shape[0]}; use diff_of_means for unpaired sets"
        )
    n, d = positive.shape[0], positive.shape[-1]
    if not 1 <= k <= min(n, d):
        raise ValueError(f"k must be between 1 and min(n_pairs={n}, d={d}), got {k}")
    dtype = torch.promote_types(positive.dtype, torch.float32)
    diffs = positive.to(dtype) - negative.to(dtype).to(positive.device)  # [n, ..., d]
    rows = einops.rearrange(diffs, "n ... d -> ... n d")
    if center:
        rows = rows - rows.mean(-2, keepdim=True)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)  # vh: [..., min(n, d), d]
    components = vh[..., :k, :]
    mean_diff = rows.mean(-2) if not center else diffs.mean(0)
    mean_proj = einops.einsum(components, mean_diff, "... k d, ... d -> ... k")
    # Sign: point from negative to positive (mean difference positive); with a zero mean
    # projection fall back to the sign of the largest-magnitude coordinate, for determinism.
    largest = components.gather(-1, components.abs().argmax(-1, keepdim=True)).squeeze(-1)
    sign = torch.where(mean_proj.abs() > 1e-8 * s[..., :1].clamp_min(1e-30), mean_proj.sign(),
                       largest.sign())
    components = components * sign[..., None]
    mean_proj = mean_proj * sign
    power = s**2
    explained = power[..., :k] / power.sum(-1, keepdim=True).clamp_min(1e-30)
    return PCADirections(components, explained, mean_proj)


def probe_direction(probe: Any) -> Float[Tensor, "... d"]:
    """The weight direction of a linear probe, in the raw activation space (unnormalised).

    A logistic-regression probe scores `w . x + b`; `w` is the direction the concept is
    *read* along. When the probe standardised its inputs first (`(x - mu) / sigma`), the raw
    space direction is `w / sigma`, which this function returns. Note that a probe direction
    is `Sigma^-1`-whitened relative to the class-mean difference: it discounts directions of
    high within-class variance, so it classifies well but usually steers worse than
    `diff_of_means` (see Marks & Tegmark 2023).

    Accepts:
        - a tensor or numpy array: `[d]`, `[1, d]` (squeezed) or `[layer, d]`;
        - an object with `direction` (a tensor or array: used as it is), or `coef_`
          (scikit-learn estimators; a `Pipeline` whose last step has `coef_` and that holds a
          `StandardScaler` is mapped back through the scaler's `scale_`), or `weight`
          (`torch.nn.Linear` with one output), or `w`;
        - a mapping `{layer: probe}` or a sequence of probes: one row per probe, `[layer, d]`.

    Raises:
        ValueError: a multi-class probe (more than one output row) or an object without any
            of these attributes.
    """
    if isinstance(probe, (Tensor, np.ndarray)):
        w = _as_float_tensor(probe, "probe weights").detach()
        if w.ndim == 2 and w.shape[0] == 1:
            w = w[0]
        if w.ndim not in (1, 2):
            raise ValueError(
                f"probe weights must be [d], [1, d] or [layer, d], got {tuple(w.shape)}"
            )
        return w.float() if w.dtype != torch.float64 else w
    if isinstance(probe, Mapping):
        return torch.stack([probe_direction(p) for p in probe.values()])
    if isinstance(probe, Sequence) and not isinstance(probe, str):
        return torch.stack([probe_direction(p) for p in probe])
    if hasattr(probe, "direction"):
        return probe_direction(torch.as_tensor(np.asarray(probe.direction)))
    steps = getattr(probe, "steps", None)  # sklearn Pipeline
    if steps is not None:
        w = probe_direction(steps[-1][1])
        for _, step in steps[:-1]:
            scale = getattr(step, "scale_", None)
            if scale is not None:
                w = w / torch.as_tensor(np.asarray(scale), dtype=w.dtype)
        return w
    for attr in ("coef_", "weight", "w"):
        value = getattr(probe, attr, None)
        if value is not None:
            raw = value.detach().cpu() if isinstance(value, Tensor) else value
            w = probe_direction(torch.as_tensor(np.asarray(raw)))
            if w.ndim == 2:
                raise ValueError(
                    f"the probe's {attr} has {w.shape[0]} rows: a multi-class probe has one "
                    "direction per class; pass the row you want"
                )
            scale = getattr(probe, "scale_", None)
            return w / torch.as_tensor(np.asarray(scale), dtype=w.dtype) if scale is not None else w
    raise ValueError(
        f"cannot read a direction from a {type(probe).__name__}: pass a tensor, or an object "
        "with `direction`, `coef_` (scikit-learn), `weight` (torch.nn.Linear) or `w`"
    )


# --------------------------------------------------------------------------------------------
# Comparing directions
# --------------------------------------------------------------------------------------------


class CosineMatrix(NamedTuple):
    """Cosine similarities between concept vectors.

    Attributes:
        values: `[n, n]` cosine similarities.
        labels: `n` strings `"concept@L<layer>"` (or just `"concept"` for a `[d]` vector).
        keys: `n` `(concept, layer)` pairs (layer None for a `[d]` vector).
    """

    values: Float[Tensor, "n n"]
    labels: list[str]
    keys: list[tuple[str, int | None]]


def _rows(vectors: Mapping[str, Tensor], layers: Sequence[int] | None) -> tuple[Tensor, list]:
    if not vectors:
        raise ValueError("no vectors given")
    rows, keys = [], []
    for name, v in vectors.items():
        v = _as_float_tensor(v, f"vector {name!r}").detach().float().cpu()
        if v.ndim == 1:
            rows.append(v[None])
            keys.append((name, None))
        elif v.ndim == 2:
            chosen = range(v.shape[0]) if layers is None else layers
            for layer in chosen:
                if not -v.shape[0] <= layer < v.shape[0]:
                    raise ValueError(
                        f"layer {layer} out of range for {name!r} with {v.shape[0]} layers"
                    )
                rows.append(v[layer][None])
                keys.append((name, layer % v.shape[0]))
        else:
            raise ValueError(f"vector {name!r} must be [d] or [layer, d], got {tuple(v.shape)}")
    sizes = {r.shape[-1] for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"vectors have different sizes {sorted(sizes)}; they must share d")
    return torch.cat(rows), keys


def _cosine(rows: Float[Tensor, "n d"]) -> Float[Tensor, "n n"]:
    norms = rows.norm(dim=-1, keepdim=True)
    normed = torch.where(norms > 0, rows / norms.clamp_min(1e-30), torch.zeros_like(rows))
    return (normed @ normed.T).clamp(-1.0, 1.0)


def cosine_matrix(
    vectors: Mapping[str, Float[Tensor, "layer d"] | Float[Tensor, " d"]],
    layers: Sequence[int] | None = None,
) -> CosineMatrix:
    """Cosine similarity of every (concept, layer) vector with every other.

    Rows are concept-major: all layers of the first concept, then the second, ... so the
    diagonal blocks show how a concept's direction drifts across depth and the off-diagonal
    blocks how concepts relate. A zero vector gets cosine 0 with everything (also itself).

    Args:
        vectors: `{concept: [layer, d] or [d]}`.
        layers: only these layers of each `[layer, d]` vector (default all).

    Returns:
        A `CosineMatrix` (values, labels, keys); `plots.heatmap(m.values, m.labels, m.labels,
        ...)` draws it.
    """
    rows, keys = _rows(vectors, layers)
    labels = [name if layer is None else f"{name}@L{layer}" for name, layer in keys]
    return CosineMatrix(_cosine(rows), labels, keys)


def cosine_by_layer(
    vectors: Mapping[str, Float[Tensor, "layer d"]],
) -> Float[Tensor, "layer concept concept"]:
    """Concept-by-concept cosine similarities at each layer (concepts in `vectors` order).

    All vectors must be `[layer, d]` with the same number of layers.
    """
    shapes = {tuple(torch.as_tensor(v).shape) for v in vectors.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"cosine_by_layer needs [layer, d] vectors of one shape, got {shapes}")
    stacked = torch.stack([_as_float_tensor(v, name).detach().float().cpu()
                           for name, v in vectors.items()], dim=1)  # [layer, concept, d]
    return torch.stack([_cosine(layer_rows) for layer_rows in stacked])


def project(
    activations: Float[Tensor, "... d"], direction: Float[Tensor, " d"]
) -> Float[Tensor, "..."]:
    """Scalar projection of activations on the unit direction `direction / |direction|`."""
    activations = _as_float_tensor(activations, "activations")
    u = unit(_as_float_tensor(direction, "direction")).to(activations.device)
    dtype = torch.promote_types(activations.dtype, torch.float32)
    return einops.einsum(activations.to(dtype), u.to(dtype), "... d, d -> ...")


# --------------------------------------------------------------------------------------------
# Intervening
# --------------------------------------------------------------------------------------------


def inject(
    model: HookedTransformer,
    vector: Float[Tensor, " d_model"] | Float[Tensor, "n_layers_chosen d_model"],
    layers: _hooks.Layers,
    from_position: int = -1,
    scale: float = 1.0,
    hook: str | Sequence[str] = "resid_pre",
) -> _hooks.Steer:
    """Add `scale * vector` at every token from `from_position` onward, generated ones included.

    A thin wrapper over `interp.hooks.steer(..., from_position=...)`, the form used to inject
    a concept "from a chosen token onward during generation" (e.g. the introspection
    experiments inject a thought from the turn where the model is asked about it). Use it as a
    context manager around `generate_with` (or `model.generate`), whose KV cache it handles:
    positions are absolute positions of the whole sequence, so a token that is in the cache
    keeps the injection it got when it was new.

    `from_position=-1` (the default) starts at the last prompt token and follows every new
    token; with a batch of left-padded prompts (as `generate_with` builds them) the prompts
    end at the same position, so negative positions count back from each prompt's end.

    Returns:
        A `Steer` hook; `with inject(model, v, layers=[6], from_position=p, scale=4.0): ...`.
    """
    return _hooks.steer(model, vector, layers=layers, scale=scale, hook=hook,
                        from_position=from_position)


class WeightEdit(_edits.WeightEdit):
    """The weights `orthogonalise_weights` changed, with their original values; undoable.

    An `interp.edits.WeightEdit` (`restore()`, context manager, `record`) that also keeps the
    projected direction. `with orthogonalise_weights(model, d): ...` restores on exit.

    Attributes:
        model: the edited model.
        direction: the unit direction that was projected out.
        originals: `{parameter name: original values}` (clones).
    """

    def __init__(self, model: HookedTransformer, direction: Tensor, originals: dict[str, Tensor]):
        super().__init__(model, originals, record={"kind": "orthogonalise_weights",
                                                   "parameters": list(originals)})
        self.direction = direction


def writing_parameters(model: HookedTransformer) -> list[str]:
    """Names of the parameters that write into the residual stream: the token embedding,
    learned absolute positions (`standard` positional embeddings only), and per block the
    attention output (W_O, b_O) and the MLP output (W_out, b_out)."""
    cfg = model.cfg
    if getattr(cfg, "use_normalization_before_and_after", False):
        raise NotImplementedError(
            f"{cfg.model_name} normalises each sublayer's output before adding it to the "
            "residual stream (Gemma 2/3 post-norms): the norm's per-coordinate scale re-creates "
            "the direction, so no weight edit removes it. Use hooks.ablate_direction instead."
        )
    if getattr(cfg, "num_experts", None):
        raise NotImplementedError(
            f"{cfg.model_name} is a mixture-of-experts model; orthogonalising expert weights is "
            "not implemented. Use hooks.ablate_direction instead."
        )
    names = ["embed.W_E"]
    if cfg.positional_embedding_type == "standard":
        names.append("pos_embed.W_pos")
    params = dict(model.named_parameters())
    for layer in range(cfg.n_layers):
        for suffix in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out"):
            name = f"blocks.{layer}.{suffix}"
            if name in params:
                names.append(name)
    return names


@torch.no_grad()
def orthogonalise_weights(
    model: HookedTransformer, direction: Float[Tensor, " d_model"]
) -> WeightEdit:
    """Edit, in place, every weight that writes to the residual stream so it never writes `d`.

    The weight-space form of directional ablation (Arditi et al. 2024, section 4): for each
    matrix `W` whose output lies in the residual stream, `W <- W - (W u) u^T` with
    `u = d / |d|`, and for each such bias `b <- b - (b . u) u`. Edited: the token embedding
    `W_E`, learned positional embeddings `W_pos` (if any), and per block `W_O`, `b_O`, `W_out`,
    `b_out` (`writing_parameters` lists them). Then no component can put anything along `u`
    into the residual stream, so at every layer the residual has no component along `u`, and
    the model computes exactly what it computes with `hooks.ablate_direction(model, d)` at
    `resid_pre`, `attn_out` and `mlp_out` of every layer (those hooks then remove nothing).
    The unembedding is not touched (it reads, it does not write), and neither are untied
    copies of the embedding in `W_U`.

    Caveats: this holds for pre-norm models whose sublayer outputs are added to the residual
    as they are; models with post-sublayer norms (Gemma 2/3) or mixtures of experts raise
    `NotImplementedError`. With half-precision weights the edit is computed in float32 and
    rounded, so the residual keeps a rounding-sized component. Weight processing (folded
    norms, centred writing weights) does not matter: the edit acts on whatever the weights are.

    Args:
        model: edited in place.
        direction: `[d_model]`, need not be normalised.

    Returns:
        A `WeightEdit`: `.restore()` (or leaving its `with` block) puts the weights back.
    """
    direction = _as_float_tensor(torch.as_tensor(direction), "direction").detach()
    if direction.ndim != 1 or direction.shape[0] != model.cfg.d_model:
        raise ValueError(
            f"direction must be [d_model={model.cfg.d_model}], got {tuple(direction.shape)}"
        )
    u = unit(direction.double())
    params = dict(model.named_parameters())
    originals: dict[str, Tensor] = {}
    for name in writing_parameters(model):
        p = params[name]
        if p.shape[-1] != model.cfg.d_model:
            raise AssertionError(f"{name} has shape {tuple(p.shape)}; expected last axis d_model")
        originals[name] = p.detach().clone()
        w = p.detach().double()
        uu = u.to(w.device)
        w = w - einops.einsum(w, uu, "... d, d -> ...")[..., None] * uu
        p.copy_(w.to(p.dtype))
    return WeightEdit(model, u.float(), originals)
