"""Domain concept vectors, their similarity across layers, and the test of whether similarity
to an unlearned domain predicts how much refusal another domain loses.

Mushtaq et al. (arXiv 2511.14017) explain the spread of narrow refusal unlearning with concept
vectors: per domain and layer, the mean activation at the last instruction token over the
domain's prompts minus the mean over harmless prompts (`domain_vectors`, a difference of means
as `interp.concepts.vectors.diff_of_means`). Domains whose vectors are more similar to the
target's *in early layers* lose more refusal. Here:

- `similarity_by_layer`: the cosine similarity matrix between domains at every layer
  (`interp.concepts.vectors.cosine_by_layer`);
- `similarity_to_target`: each other domain's cosine with the target, averaged over a band of
  layers (`layer_band`: the first or last third of the layers by default);
- `similarity_drop_correlation`: Spearman's rank correlation (`scipy.stats.spearmanr`) between
  that similarity and the domain's refusal drop, with `n` the number of domains correlated. With
  five or six domains only a perfect ordering is significant at 0.05 (n = 5: |rho| = 1 gives
  p = 0.017 exactly; the p-value of scipy is the t approximation, so read rho and n together).

The activations are read at `resid_pre` of each layer (the input of block L), at the last prompt
token, which for a chat model is the end of the assistant header, where the model decides how
to answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.concepts.collect import collect
from interp.concepts.vectors import cosine_by_layer

__all__ = [
    "domain_vectors",
    "last_token_means",
    "layer_band",
    "projections",
    "similarity_by_layer",
    "similarity_drop_correlation",
    "similarity_to_target",
]

Prompts = Sequence[Sequence[int]]


@torch.no_grad()
def last_token_means(
    model: HookedTransformer, prompts: Prompts, hook: str = "resid_pre", batch_size: int = 16
) -> Float[Tensor, "layer d_model"]:
    """Mean over prompts (token-id lists) of the activation at the last token, every layer."""
    acts = collect(model, [list(p) for p in prompts], hooks=hook, layers="all", pool="last",
                   batch_size=batch_size, progress=False)
    by_layer = acts.by_layer()
    return torch.stack([by_layer[layer].double().mean(0) for layer in sorted(by_layer)]).float()


def domain_vectors(
    model: HookedTransformer,
    domain_prompts: Mapping[str, Prompts],
    harmless: Prompts,
    hook: str = "resid_pre",
    batch_size: int = 16,
) -> dict[str, Float[Tensor, "layer d_model"]]:
    """`{domain: mean last-token activation over its prompts - the same mean over harmless
    prompts}` at every layer's `hook`."""
    if not harmless:
        raise ValueError("domain_vectors needs harmless prompts to subtract")
    empty = [d for d, p in domain_prompts.items() if not p]
    if empty:
        raise ValueError(f"domains without prompts: {empty}")
    base = last_token_means(model, harmless, hook, batch_size)
    return {d: last_token_means(model, p, hook, batch_size) - base
            for d, p in domain_prompts.items()}


def similarity_by_layer(
    vectors: Mapping[str, Float[Tensor, "layer d_model"]],
) -> Float[Tensor, "layer domain domain"]:
    """Cosine similarity between every pair of domains at every layer (`vectors` order)."""
    return cosine_by_layer(vectors)


def layer_band(n_layers: int, band: Literal["early", "late"] | Sequence[int],
               fraction: float = 1 / 3) -> list[int]:
    """The layers of a band: `early` the first `ceil(fraction * n)` (layer 0 left out: its
    `resid_pre` is the token embedding, the same for every prompt's last template token), `late`
    the last `ceil(fraction * n)`; a list of layers is returned as it is (checked)."""
    if not isinstance(band, str):
        layers = sorted(set(int(x) for x in band))
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad or not layers:
            raise ValueError(f"layers {bad or layers} are not in range for {n_layers} layers")
        return layers
    k = max(1, math.ceil(fraction * n_layers - 1e-9))
    if band == "early":
        return list(range(1, min(n_layers, k + 1)))
    if band == "late":
        return list(range(n_layers - k, n_layers))
    raise ValueError(f"band must be 'early', 'late' or a list of layers, got {band!r}")


def similarity_to_target(
    similarity: Float[Tensor, "layer domain domain"],
    domains: Sequence[str],
    target: str,
    layers: Sequence[int],
) -> dict[str, float]:
    """`{domain: mean over layers of cos(domain, target)}` for every domain but the target."""
    if target not in domains:
        raise ValueError(f"target {target!r} is not one of the domains {list(domains)}")
    if similarity.shape[1:] != (len(domains), len(domains)):
        raise ValueError(f"similarity has shape {tuple(similarity.shape)} but there are "
                         f"{len(domains)} domains")
    t = list(domains).index(target)
    band = similarity[list(layers)].double().mean(0)
    return {d: float(band[i, t]) for i, d in enumerate(domains) if d != target}


def similarity_drop_correlation(
    similarity: Mapping[str, float], drop: Mapping[str, float]
) -> dict[str, Any]:
    """Spearman's rho (and scipy's p-value) between similarity to the target and refusal drop,
    over the domains both give; `n` is the number of domains. rho is None (undefined) with
    fewer than 3 domains or a constant variable."""
    from scipy.stats import spearmanr

    domains = [d for d in similarity if d in drop]
    x = [similarity[d] for d in domains]
    y = [drop[d] for d in domains]
    out: dict[str, Any] = {"n": len(domains), "domains": domains, "similarity": x, "drop": y,
                           "rho": None, "p": None}
    if len(domains) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
        res = spearmanr(x, y)
        out["rho"], out["p"] = float(res.statistic), float(res.pvalue)
    return out


@torch.no_grad()
def projections(
    model: HookedTransformer,
    domain_prompts: Mapping[str, Prompts],
    direction: Float[Tensor, " d_model"],
    layer: int,
    hook: str = "resid_pre",
    batch_size: int = 16,
) -> dict[str, float]:
    """Each domain's mean scalar projection of its last-token activation at `layer` onto the
    unit `direction`."""
    unit = direction.float() / direction.float().norm().clamp_min(1e-12)
    out = {}
    for d, prompts in domain_prompts.items():
        acts = collect(model, [list(p) for p in prompts], hooks=hook, layers=layer, pool="last",
                       batch_size=batch_size, progress=False)
        out[d] = float((acts[acts.hook_names[0]].float() @ unit.cpu()).mean())
    return out
