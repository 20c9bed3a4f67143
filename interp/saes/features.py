"""Inspect SAE latents: activation density, top-activating contexts, decoder logit lens.

All statistics come from one streaming pass over a token set (`feature_stats`): the model runs
up to the SAE's layer, the SAE encodes the activation, and for every latent we keep

- its **density**: the fraction of tokens where it is active (`> 0`), and its mean activation
  when active;
- its **top contexts**: the `k` sequences where it reaches its highest activation, at most one
  per sequence (so a latent that fires on every token of one long passage still shows `k`
  different passages), with the position of that maximum.

`top_contexts` then re-encodes just those sequences to get the latent's activation on every
token of a window around the maximum, for marking the activating tokens (`interp.saes.pages`
shades each token by its activation).

The **decoder logit lens** multiplies a latent's decoder direction by the unembedding,
`W_dec[i] @ W_U`, and lists the tokens it promotes most and least: what the latent writes, read
directly as next-token logits (no final norm, no later layers: a first-order reading that is
most meaningful for late residual-stream and MLP-output SAEs).

Positions before `skip_first` (default the SAE's own, see `interp.saes.quality.sae_skip_first`)
count as inactive everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.saes.activations import stop_layer
from interp.saes.quality import sae_skip_first

__all__ = [
    "Context",
    "FeatureReport",
    "FeatureStats",
    "activation_density",
    "feature_stats",
    "inspect_features",
    "latent_activations",
    "logit_lens",
    "token_strings",
    "top_contexts",
]


@dataclass(frozen=True)
class FeatureStats:
    """Per-latent statistics over a token set.

    Attributes:
        density: fraction of tokens where each latent is active.
        mean_active: mean activation over the tokens where it is active (0 if never).
        top_values: the `k` highest per-sequence maxima of each latent, descending.
        top_seq: the sequences (rows of the token set) they come from (-1: none).
        top_pos: the positions of those maxima.
        n_tokens: tokens counted.
        skip_first: leading positions left out.
    """

    density: Float[Tensor, " d_sae"]
    mean_active: Float[Tensor, " d_sae"]
    top_values: Float[Tensor, "d_sae k"]
    top_seq: Int[Tensor, "d_sae k"]
    top_pos: Int[Tensor, "d_sae k"]
    n_tokens: int
    skip_first: int

    @property
    def max_act(self) -> Float[Tensor, " d_sae"]:
        return self.top_values[:, 0].clamp(min=0)

    @property
    def live(self) -> Int[Tensor, " n_live"]:
        """Latents active at least once."""
        return torch.nonzero(self.density > 0).flatten()


@dataclass(frozen=True)
class Context:
    """A window of one sequence around a latent's maximum activation there.

    Attributes:
        tokens: the window's tokens as text.
        acts: the latent's activation on each of them.
        seq: the sequence's row in the token set.
        start: position of the window's first token in the sequence.
        max_pos: position of the maximum within the window (index into `tokens`).
        max_act: the maximum.
    """

    tokens: list[str]
    acts: list[float]
    seq: int
    start: int
    max_pos: int
    max_act: float


@dataclass
class FeatureReport:
    """Everything `pages` shows about one latent.

    Attributes:
        index: the latent.
        density: fraction of tokens where it is active.
        mean_active: mean activation when active.
        max_act: highest activation seen.
        contexts: top contexts, highest first.
        logit_top, logit_bottom: (token, logit) pairs of the decoder logit lens.
    """

    index: int
    density: float
    mean_active: float
    max_act: float
    contexts: list[Context] = field(default_factory=list)
    logit_top: list[tuple[str, float]] = field(default_factory=list)
    logit_bottom: list[tuple[str, float]] = field(default_factory=list)


def latent_activations(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    tokens: Int[Tensor, "batch pos"],
    batch_size: int = 8,
    skip_first: int | None = None,
) -> Iterator[tuple[int, Float[Tensor, "b pos d_sae"]]]:
    """Yield `(first row, latents)` batch by batch; positions before `skip_first` are zero."""
    if hook_name not in model.hook_dict:
        raise ValueError(f"{model.cfg.model_name} has no hook point {hook_name!r}.")
    skip = sae_skip_first(sae) if skip_first is None else int(skip_first)
    stop = stop_layer([hook_name])
    device = model.W_E.device
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size].to(device)
            _, cache = model.run_with_cache(batch, names_filter=[hook_name], stop_at_layer=stop)
            f = sae.encode(cache[hook_name].to(sae.dtype)).float()
            f[:, :skip] = 0.0
            yield start, f


def feature_stats(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    tokens: Int[Tensor, "batch pos"],
    k: int = 10,
    batch_size: int = 8,
    skip_first: int | None = None,
) -> FeatureStats:
    """Density, mean activation and top-`k` sequences of every latent (module docstring)."""
    skip = sae_skip_first(sae) if skip_first is None else int(skip_first)
    d_sae = sae.cfg.d_sae
    active = torch.zeros(d_sae, dtype=torch.float64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    top_v = torch.full((d_sae, k), float("-inf"))
    top_s = torch.full((d_sae, k), -1, dtype=torch.long)
    top_p = torch.full((d_sae, k), -1, dtype=torch.long)
    n = 0
    for start, f in latent_activations(model, sae, hook_name, tokens, batch_size, skip):
        f = f.cpu()
        active += (f > 0).sum((0, 1)).double()
        total += f.sum((0, 1)).double()
        n += f.shape[0] * (f.shape[1] - skip)
        seq_max, seq_pos = f.max(dim=1)  # [b, d_sae]
        seq_max = torch.where(seq_max > 0, seq_max, torch.full_like(seq_max, float("-inf")))
        rows = torch.arange(start, start + f.shape[0]).unsqueeze(1).expand(-1, d_sae)
        cand_v = torch.cat([top_v, seq_max.T], dim=1)
        cand_s = torch.cat([top_s, rows.T], dim=1)
        cand_p = torch.cat([top_p, seq_pos.T], dim=1)
        top_v, idx = cand_v.topk(k, dim=1)
        top_s, top_p = cand_s.gather(1, idx), cand_p.gather(1, idx)
    missing = torch.isinf(top_v)
    top_s[missing], top_p[missing] = -1, -1
    top_v = torch.where(missing, torch.zeros_like(top_v), top_v)
    density = (active / max(n, 1)).float()
    mean_active = torch.where(active > 0, total / active.clamp(min=1), torch.zeros_like(total)).float()
    return FeatureStats(density=density, mean_active=mean_active, top_values=top_v, top_seq=top_s,
                        top_pos=top_p, n_tokens=n, skip_first=skip)


def activation_density(model: HookedTransformer, sae: SAE, hook_name: str,
                       tokens: Int[Tensor, "batch pos"], batch_size: int = 8,
                       skip_first: int | None = None) -> Float[Tensor, " d_sae"]:
    """Fraction of tokens on which each latent is active."""
    return feature_stats(model, sae, hook_name, tokens, k=1, batch_size=batch_size,
                         skip_first=skip_first).density


def top_contexts(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    tokens: Int[Tensor, "batch pos"],
    features: Sequence[int],
    k: int = 10,
    left: int = 24,
    right: int = 8,
    stats: FeatureStats | None = None,
    batch_size: int = 8,
) -> dict[int, list[Context]]:
    """The top-`k` contexts of each latent in `features`: windows of `left` tokens before and
    `right` after its maximum in each of its top sequences, with its activation on every token.

    `stats` (from `feature_stats` on the same tokens) avoids a second full pass.
    """
    features = [int(i) for i in features]
    if stats is None or stats.top_values.shape[1] < k:
        stats = feature_stats(model, sae, hook_name, tokens, k=k, batch_size=batch_size)
    seqs = sorted({int(s) for i in features for s in stats.top_seq[i, :k].tolist() if s >= 0})
    row_of = {s: r for r, s in enumerate(seqs)}
    acts = torch.zeros(len(seqs), tokens.shape[1], len(features))
    if seqs:
        sub = tokens[seqs]
        for start, f in latent_activations(model, sae, hook_name, sub, batch_size, stats.skip_first):
            acts[start:start + f.shape[0]] = f[:, :, features].cpu()
    out: dict[int, list[Context]] = {}
    for col, i in enumerate(features):
        contexts = []
        for s, p, v in zip(stats.top_seq[i, :k].tolist(), stats.top_pos[i, :k].tolist(),
                           stats.top_values[i, :k].tolist()):
            if s < 0:
                continue
            lo, hi = max(0, p - left), min(tokens.shape[1], p + right + 1)
            contexts.append(Context(
                tokens=token_strings(model, tokens[s, lo:hi].tolist()),
                acts=acts[row_of[s], lo:hi, col].tolist(),
                seq=s, start=lo, max_pos=p - lo, max_act=float(v),
            ))
        out[i] = contexts
    return out


def logit_lens(
    model: HookedTransformer,
    sae: SAE,
    features: Sequence[int] | None = None,
    k: int = 10,
) -> dict[int, tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Per latent: the `k` tokens its decoder direction promotes most and least (`W_dec @ W_U`).

    Raises:
        ValueError: the SAE's width is not `d_model` (e.g. an MLP-neuron or `hook_z` SAE).
    """
    if sae.cfg.d_in != model.cfg.d_model:
        raise ValueError(f"The decoder logit lens needs d_in == d_model ({model.cfg.d_model}); "
                         f"this SAE has d_in={sae.cfg.d_in}.")
    features = list(range(sae.cfg.d_sae)) if features is None else [int(i) for i in features]
    with torch.no_grad():
        w_dec = sae.W_dec[features].to(model.W_U.device, model.W_U.dtype)
        logits = (w_dec @ model.W_U).float().cpu()
    top = logits.topk(k, dim=1)
    bottom = (-logits).topk(k, dim=1)
    out = {}
    for row, i in enumerate(features):
        out[i] = (
            list(zip(token_strings(model, top.indices[row].tolist()), top.values[row].tolist())),
            list(zip(token_strings(model, bottom.indices[row].tolist()),
                     (-bottom.values[row]).tolist())),
        )
    return out


def inspect_features(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    tokens: Int[Tensor, "batch pos"],
    features: Sequence[int] | int | None = 32,
    k: int = 10,
    left: int = 24,
    right: int = 8,
    logit_k: int = 10,
    seed: int = 0,
    batch_size: int = 8,
) -> tuple[list[FeatureReport], FeatureStats]:
    """Reports for `features` (a list; an int n: n live latents drawn with `seed`; None: all).

    Returns:
        (one `FeatureReport` per feature, in the order asked, and the `FeatureStats` of all
        latents, e.g. for the density histogram of the index page).
    """
    stats = feature_stats(model, sae, hook_name, tokens, k=k, batch_size=batch_size)
    if features is None:
        chosen = list(range(sae.cfg.d_sae))
    elif isinstance(features, int):
        live = stats.live
        gen = torch.Generator().manual_seed(seed)
        chosen = sorted(live[torch.randperm(live.numel(), generator=gen)[:features]].tolist())
    else:
        chosen = [int(i) for i in features]
        bad = [i for i in chosen if not 0 <= i < sae.cfg.d_sae]
        if bad:
            raise ValueError(f"Latents {bad} out of range: the SAE has d_sae={sae.cfg.d_sae}.")
    contexts = top_contexts(model, sae, hook_name, tokens, chosen, k, left, right, stats, batch_size)
    lens = logit_lens(model, sae, chosen, logit_k) if sae.cfg.d_in == model.cfg.d_model else {}
    reports = []
    for i in chosen:
        top, bottom = lens.get(i, ([], []))
        reports.append(FeatureReport(
            index=i, density=float(stats.density[i]), mean_active=float(stats.mean_active[i]),
            max_act=float(stats.max_act[i]), contexts=contexts[i], logit_top=top,
            logit_bottom=bottom,
        ))
    return reports, stats


def token_strings(model: HookedTransformer, ids: Sequence[int]) -> list[str]:
    """Each token id as its own text (UTF-8 bytes for models without a tokenizer)."""
    if model.tokenizer is None:
        return [chr(i) if 32 <= i < 127 or i in (9, 10) else f"\\x{i:02x}" for i in ids]
    return [model.tokenizer.decode([i]) for i in ids]
