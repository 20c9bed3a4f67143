"""Sites: one way to name which activations a localisation method scores.

A *site family* is a TransformerLens hook point per layer plus the axes along which its
activation is split into sites:

| family         | hook point                  | site axes            | one site is                     |
|----------------|-----------------------------|----------------------|---------------------------------|
| `resid`        | `blocks.L.hook_resid_pre`   | layer, pos           | the residual stream at (L, pos) |
| `attn`         | `blocks.L.hook_attn_out`    | layer, pos           | attention output at (L, pos)    |
| `mlp`          | `blocks.L.hook_mlp_out`     | layer, pos           | MLP output at (L, pos)          |
| `heads`        | `blocks.L.attn.hook_z`      | layer, head          | head output z, all positions    |
| `heads_by_pos` | `blocks.L.attn.hook_z`      | layer, pos, head     | head output z at one position   |
| `neurons`      | `blocks.L.mlp.hook_post`    | layer, neuron        | one MLP neuron, all positions   |

Every method (exact patching, AtP, AtP*, integrated gradients, RelP) takes family names, the
same clean/corrupt token batches and the same metric, and returns `Scores`: values with named
axes and labels, so any two methods compare one to one (`Scores.flat()`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class SiteFamily:
    """A hook point per layer and the axes of its activation that index sites.

    Attributes:
        name: short name (`resid`, `attn`, `mlp`, `heads`, `heads_by_pos`, `neurons`).
        hook: hook-name template with `{L}` for the layer.
        axes: the site axes after `layer`, e.g. `("pos",)` or `("head",)`.
        act_axes: the axes of the activation at the hook, batch first; site axes are among them,
            the other non-batch axes are summed over (positions for `heads`) or are the vector.
    """

    name: str
    hook: str
    axes: tuple[str, ...]
    act_axes: tuple[str, ...]

    def hook_name(self, layer: int) -> str:
        return self.hook.format(L=layer)

    @property
    def dims(self) -> tuple[str, ...]:
        return ("layer", *self.axes)


FAMILIES: dict[str, SiteFamily] = {
    f.name: f
    for f in [
        SiteFamily("resid", "blocks.{L}.hook_resid_pre", ("pos",), ("batch", "pos", "d_model")),
        SiteFamily("attn", "blocks.{L}.hook_attn_out", ("pos",), ("batch", "pos", "d_model")),
        SiteFamily("mlp", "blocks.{L}.hook_mlp_out", ("pos",), ("batch", "pos", "d_model")),
        SiteFamily("heads", "blocks.{L}.attn.hook_z", ("head",), ("batch", "pos", "head", "d_head")),
        SiteFamily("heads_by_pos", "blocks.{L}.attn.hook_z", ("pos", "head"),
                   ("batch", "pos", "head", "d_head")),
        SiteFamily("neurons", "blocks.{L}.mlp.hook_post", ("neuron",), ("batch", "pos", "neuron")),
    ]
}


def family(name: str) -> SiteFamily:
    """The `SiteFamily` called `name`; a ValueError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Unknown site family {name!r}; known: {', '.join(FAMILIES)}") from None


def families(names: str | Sequence[str]) -> list[SiteFamily]:
    return [family(n) for n in ([names] if isinstance(names, str) else names)]


def axis_sizes(model: HookedTransformer, n_pos: int) -> dict[str, int]:
    return {"layer": model.cfg.n_layers, "pos": n_pos, "head": model.cfg.n_heads,
            "neuron": model.cfg.d_mlp}


@dataclass
class Scores:
    """One method's score per site of one family.

    Attributes:
        family: the site family name.
        method: which method produced the scores (`exact`, `atp`, `relp`, ...).
        values: `[n_layers, *site axes]`, the estimated or measured change of the metric when
            the site is patched (patched metric minus the target run's metric).
        dims: axis names of `values`, `("layer", "pos")` etc.
        labels: a label per index of each axis (token strings for `pos` where known).
        baseline: the metric of the unpatched target run (mean over prompts).
    """

    family: str
    method: str
    values: Float[Tensor, "layer ..."]
    dims: tuple[str, ...]
    labels: dict[str, list[str]] = field(default_factory=dict)
    baseline: float = 0.0

    def flat(self) -> Float[Tensor, " sites"]:
        """Values flattened over sites, in the same order for every method of the family."""
        return self.values.detach().flatten().float().cpu()

    def site_labels(self) -> list[str]:
        """A label per flattened site, e.g. `L3 pos5` or `L3 H2`."""
        names = {"layer": "L", "pos": "pos", "head": "H", "neuron": "N"}
        grids = torch.cartesian_prod(*[torch.arange(s) for s in self.values.shape])
        grids = grids.reshape(-1, len(self.dims))
        return [" ".join(f"{names[d]}{int(i)}" for d, i in zip(self.dims, row)) for row in grids]


def default_labels(model: HookedTransformer, fam: SiteFamily, tokens: Tensor) -> dict[str, list[str]]:
    """Axis labels: layer numbers, head numbers, and positions named by the first prompt's tokens."""
    labels = {"layer": [str(i) for i in range(model.cfg.n_layers)]}
    if "pos" in fam.axes:
        if model.tokenizer is not None:
            labels["pos"] = [f"{i}:{model.tokenizer.decode([int(t)])}" for i, t in enumerate(tokens[0])]
        else:
            labels["pos"] = [str(i) for i in range(tokens.shape[1])]
    if "head" in fam.axes:
        labels["head"] = [str(i) for i in range(model.cfg.n_heads)]
    if "neuron" in fam.axes:
        labels["neuron"] = [str(i) for i in range(model.cfg.d_mlp)]
    return labels
