"""Which parameters a fine-tuning run may change: parameter scopes.

A scope is a small description (`Full()`, `Named("blocks.*.mlp.W_out")`, `Masked({...})`,
`Indexed(name, index)`, `needle(layer, d)`, `LoRA(...)`) that `apply(model)` turns into an
`AppliedScope`: the parameters to optimise, and what must happen around each optimiser step.

- **Full**: every parameter.
- **Named**: parameters whose name matches a glob (`fnmatch`, `*` also matches dots:
  `"blocks.*.mlp.W_out"`) or, with the prefix `re:`, a regular expression (`re.fullmatch`).
- **Masked / Indexed**: parts of parameters, down to single rows or columns, given as a boolean
  mask of the parameter's shape (or an index into it). The whole parameter is optimised, and
  two things keep every other entry fixed: gradients are multiplied by the mask before
  clipping (so the gradient norm counts trainable entries only), and after every optimiser
  step the masked-out entries are written back from a copy taken when the scope was applied.
  The second is needed because a zero gradient does not mean a zero update: AdamW's weight
  decay moves every entry, and so do momentum terms left from earlier gradients. Entries
  outside the mask therefore stay bit-for-bit what they were.
- **needle(layer, d)**: the value vector `d` of layer `layer`'s MLP, i.e. the row
  `blocks.{layer}.mlp.W_out[d, :]` (TransformerLens stores `W_out` as `[d_mlp, d_model]`;
  Hugging Face's `down_proj.weight` is its transpose, so the same vector is a column there).
  The ConceptVectors "Needle" unlearning adds Gaussian noise to that vector
  (`interp.edits.add_noise`) and then runs gradient ascent on it alone.
- **LoRA**: low-rank adapters (Hu et al. 2021) on chosen weight matrices, via
  `torch.nn.utils.parametrize`: `W` is replaced by `W + (alpha / rank) * A @ B` with
  `A: [..., d_in, rank]` (uniform in +-1/sqrt(d_in)) and `B: [..., rank, d_out]` (zeros, so
  training starts at the original model). TransformerLens weights are `[d_in, d_out]` with
  leading axes for heads (`W_Q: [head, d_model, d_head]`); every leading index gets its own
  adapter. Only the adapters are trained. Models with grouped-query attention keep their key
  and value weights as `attn._W_K` / `attn._W_V` (`[kv_head, d_model, d_head]`; `W_K` is a
  property that repeats them), so match those names (`"blocks.*.attn._W_V"`). `merge_lora(model)` writes `W + delta` into the
  weights and removes the parametrisation (`remove_lora` discards the adapters instead).

An `AppliedScope` records the `requires_grad` flags it changed; `close()` restores them (the
training loop calls it at the end). LoRA adapters stay on the model until merged or removed.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformer_lens import HookedTransformer

__all__ = [
    "AppliedScope",
    "Full",
    "Indexed",
    "LoRA",
    "LowRankAdapter",
    "Masked",
    "Named",
    "Scope",
    "has_lora",
    "match_parameters",
    "merge_lora",
    "needle",
    "remove_lora",
]


def match_parameters(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Names of the parameters that match any pattern, in the model's order.

    A pattern is a glob (`fnmatch.fnmatchcase`: `*` matches any characters, dots included) or,
    prefixed with `re:`, a regular expression that must match the whole name.

    Raises:
        ValueError: a pattern that matches no parameter (the message lists a few real names).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no parameter patterns given")
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern.startswith("re:"):
            rx = re.compile(pattern[3:])
            hits = [n for n in names if rx.fullmatch(n)]
        else:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            examples = ", ".join(names[:4] + names[-3:]) if len(names) > 7 else ", ".join(names)
            raise ValueError(
                f"the parameter pattern {pattern!r} matches no parameter of "
                f"{getattr(getattr(model, 'cfg', None), 'model_name', type(model).__name__)}. "
                f"Names look like: {examples} (glob: 'blocks.*.mlp.W_out'; regex: "
                "'re:blocks\\.(1|2)\\.attn\\.W_[QK]')"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


class AppliedScope:
    """A scope applied to a model: the parameters to optimise and the per-step rules.

    Attributes:
        params: `{name: parameter}` to optimise (names as in `model.named_parameters()`).
        masks: `{name: bool mask}` for parameters trained only in part.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter],
                 masks: Mapping[str, Tensor] | None = None):
        self.model = model
        self.params = params
        self.masks = dict(masks or {})
        self._frozen = {n: params[n].detach().clone() for n in self.masks}
        self._flags = {p: p.requires_grad for _, p in model.named_parameters()}
        for _, p in model.named_parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)

    @property
    def n_trainable(self) -> int:
        """Entries that may change: mask sums for masked parameters, sizes for the others."""
        return sum(int(self.masks[n].sum()) if n in self.masks else p.numel()
                   for n, p in self.params.items())

    def mask_gradients(self) -> None:
        """Zero the gradients of masked-out entries (call before clipping)."""
        for name, mask in self.masks.items():
            grad = self.params[name].grad
            if grad is not None:
                grad.mul_(mask.to(grad.dtype))

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the masked-out entries back (call after every optimiser step)."""
        for name, mask in self.masks.items():
            p = self.params[name]
            p.copy_(torch.where(mask, p, self._frozen[name]))

    def close(self) -> None:
        """Restore the `requires_grad` flags the scope changed."""
        for p, flag in self._flags.items():
            p.requires_grad_(flag)


class Scope:
    """Base class: `apply(model)` returns the `AppliedScope`."""

    def apply(self, model: HookedTransformer) -> AppliedScope:
        raise NotImplementedError


@dataclass(frozen=True)
class Full(Scope):
    """Every parameter."""

    def apply(self, model: HookedTransformer) -> AppliedScope:
        return AppliedScope(model, dict(model.named_parameters()))


@dataclass(frozen=True)
class Named(Scope):
    """The parameters whose names match any of `patterns` (see `match_parameters`)."""

    patterns: tuple[str, ...]

    def __init__(self, *patterns: str):
        flat = tuple(p for item in patterns for p in ([item] if isinstance(item, str) else item))
        object.__setattr__(self, "patterns", flat)

    def apply(self, model: HookedTransformer) -> AppliedScope:
        params = dict(model.named_parameters())
        return AppliedScope(model, {n: params[n] for n in match_parameters(model, self.patterns)})


def _check_mask(model: nn.Module, name: str, mask: Tensor) -> Bool[Tensor, "*shape"]:
    params = dict(model.named_parameters())
    if name not in params:
        match_parameters(model, name)  # raises with a list of real names
    p = params[name]
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != tuple(p.shape):
        raise ValueError(f"the mask for {name} has shape {tuple(mask.shape)} but the weight "
                         f"has shape {tuple(p.shape)}; they must be equal")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"the mask for {name} must be boolean (or 0/1), got other values")
        mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError(f"the mask for {name} selects no entry")
    return mask.to(p.device)


@dataclass
class Masked(Scope):
    """Only the entries where `masks[name]` is True (one boolean mask per parameter, of its
    shape); every other entry stays bit-for-bit unchanged (see the module docstring)."""

    masks: Mapping[str, Tensor]

    def apply(self, model: HookedTransformer) -> AppliedScope:
        if not self.masks:
            raise ValueError("Masked needs at least one {parameter name: mask}")
        params = dict(model.named_parameters())
        masks = {n: _check_mask(model, n, m) for n, m in self.masks.items()}
        return AppliedScope(model, {n: params[n] for n in masks}, masks)


@dataclass
class Indexed(Scope):
    """Only `param[index]` of the parameter `name` (a row: `(3,)`; a column:
    `(slice(None), 5)`; anything torch indexing accepts)."""

    name: str
    index: Any

    def apply(self, model: HookedTransformer) -> AppliedScope:
        params = dict(model.named_parameters())
        if self.name not in params:
            match_parameters(model, self.name)
        mask = torch.zeros(params[self.name].shape, dtype=torch.bool)
        try:
            mask[self.index] = True
        except IndexError as exc:
            raise ValueError(f"index {self.index!r} does not fit {self.name} of shape "
                             f"{tuple(mask.shape)}: {exc}") from exc
        return Masked({self.name: mask}).apply(model)


def needle(layer: int, index: int) -> Indexed:
    """The scope of one MLP value vector: the row `blocks.{layer}.mlp.W_out[index, :]`."""
    return _NeedleScope(f"blocks.{layer}.mlp.W_out", (index,), layer, index)


@dataclass
class _NeedleScope(Indexed):
    layer: int = 0
    neuron: int = 0

    def apply(self, model: HookedTransformer) -> AppliedScope:
        cfg = model.cfg
        if not 0 <= self.layer < cfg.n_layers:
            raise ValueError(f"layer {self.layer} is out of range: the model has {cfg.n_layers} layers")
        if not 0 <= self.neuron < cfg.d_mlp:
            raise ValueError(f"value vector {self.neuron} is out of range: d_mlp is {cfg.d_mlp}")
        return super().apply(model)


# --------------------------------------------------------------------------------------------
# Low-rank adapters
# --------------------------------------------------------------------------------------------


class LowRankAdapter(nn.Module):
    """A parametrisation `W -> W + (alpha / rank) * A @ B` over the last two axes of `W`."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float, dtype: torch.dtype,
                 device: torch.device, generator: torch.Generator):
        super().__init__()
        *lead, d_in, d_out = shape
        bound = 1.0 / math.sqrt(d_in)
        a = (torch.rand((*lead, d_in, rank), generator=generator) * 2 - 1) * bound
        self.A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros((*lead, rank, d_out), device=device, dtype=dtype))
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * (self.A @ self.B)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


@dataclass(frozen=True)
class LoRA(Scope):
    """Low-rank adapters on the weights matching `patterns` (matrices, at least 2-D).

    Attributes:
        patterns: globs / `re:` regexes of weight names (e.g. `"blocks.*.attn.W_[QV]"`).
        rank: adapter rank r.
        alpha: scale numerator: the update is `(alpha / rank) * A @ B`.
        seed: seed of the `A` initialisation (so a run is reproducible).
    """

    patterns: tuple[str, ...] | str = ("blocks.*.mlp.W_out",)
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0

    def apply(self, model: HookedTransformer) -> AppliedScope:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        patterns = (self.patterns,) if isinstance(self.patterns, str) else self.patterns
        if has_lora(model):
            raise ValueError("the model already has LoRA adapters; merge_lora(model) or "
                             "remove_lora(model) first")
        names = match_parameters(model, patterns)
        params = dict(model.named_parameters())
        gen = torch.Generator().manual_seed(self.seed)
        adapters: dict[str, nn.Parameter] = {}
        for name in names:
            p = params[name]
            if p.ndim < 2:
                raise ValueError(f"LoRA needs weight matrices, but {name} has shape "
                                 f"{tuple(p.shape)}; choose matrices (W_...) only")
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            adapter = LowRankAdapter(p.shape, self.rank, self.alpha, p.dtype, p.device, gen)
            parametrize.register_parametrization(module, attr, adapter)
            adapters[f"{module_name}.parametrizations.{attr}.0.A"] = adapter.A
            adapters[f"{module_name}.parametrizations.{attr}.0.B"] = adapter.B
        return AppliedScope(model, adapters)


def _adapted(model: nn.Module) -> list[tuple[nn.Module, str]]:
    out = []
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                if any(isinstance(p, LowRankAdapter) for p in plist):
                    out.append((module, attr))
    return out


def has_lora(model: nn.Module) -> bool:
    """Whether any weight of `model` carries a `LowRankAdapter`."""
    return bool(_adapted(model))


def merge_lora(model: nn.Module) -> int:
    """Write every adapted weight's current value `W + delta` into the weight and remove the
    parametrisation (parameter names are as before the adapters). Returns how many weights."""
    pairs = _adapted(model)
    for module, attr in pairs:
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return len(pairs)


def remove_lora(model: nn.Module) -> int:
    """Discard every adapter, leaving the original weights. Returns how many weights."""
    pairs = _adapted(model)
    for module, attr in pairs:
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    return len(pairs)
