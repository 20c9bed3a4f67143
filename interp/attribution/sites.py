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
from typing import Sequence, Union

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
    layers: tuple[int, ...] | None = None
    """The layers that have this hook (None: every layer). A layer is the index of the block
    that contains the hook point: patched runs start from the residual stream entering it."""

    def hook_name(self, layer: int) -> str:
        return self.hook.format(L=layer)

    def layer_list(self, model: HookedTransformer) -> list[int]:
        return list(range(model.cfg.n_layers)) if self.layers is None else list(self.layers)

    def site_shape(self, act_shape: Sequence[int]) -> tuple[int, ...]:
        """Sizes of the site axes, read from the activation's shape (batch first)."""
        if len(act_shape) != len(self.act_axes):
            raise ValueError(
                f"site family {self.name!r} expects activations with axes {self.act_axes} at "
                f"{self.hook!r}, got shape {tuple(act_shape)}"
            )
        return tuple(act_shape[self.act_axes.index(a)] for a in self.axes)

    @property
    def reduce_pattern(self) -> str:
        """einops pattern from an activation-shaped tensor to the site axes (summing the rest)."""
        return f"{' '.join(self.act_axes)} -> {' '.join(self.axes)}"

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


def family(name: str | SiteFamily) -> SiteFamily:
    """The `SiteFamily` called `name` (a `SiteFamily` is returned as it is, so custom families,
    e.g. SAE latents, go wherever names do); a ValueError listing the known ones otherwise."""
    if isinstance(name, SiteFamily):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Unknown site family {name!r}; known: {', '.join(FAMILIES)}") from None


FamilySpec = Union[str, SiteFamily, Sequence[Union[str, SiteFamily]]]
"""What a method's `site_families` takes: a family's name, a `SiteFamily`, or a sequence of them."""


def families(names: FamilySpec) -> list[SiteFamily]:
    return [family(n) for n in ([names] if isinstance(names, (str, SiteFamily)) else names)]


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
        signed: False when the values are magnitudes of effects (GradDrop), not effects.
    """

    family: str
    method: str
    values: Float[Tensor, "layer ..."]
    dims: tuple[str, ...]
    labels: dict[str, list[str]] = field(default_factory=dict)
    baseline: float = 0.0
    signed: bool = True

    def flat(self) -> Float[Tensor, " sites"]:
        """Values flattened over sites, in the same order for every method of the family."""
        return self.values.detach().flatten().float().cpu()

    def site_labels(self) -> list[str]:
        """A label per flattened site, e.g. `L3 pos5` or `L3 H2` (layers by their number)."""
        names = {"layer": "L", "pos": "pos", "head": "H", "neuron": "N", "latent": "F"}
        layers = self.labels.get("layer", [str(i) for i in range(self.values.shape[0])])
        grids = torch.cartesian_prod(*[torch.arange(s) for s in self.values.shape])
        grids = grids.reshape(-1, len(self.dims))
        return [" ".join(f"{names.get(d, d)}{layers[int(i)] if d == 'layer' else int(i)}"
                         for d, i in zip(self.dims, row)) for row in grids]


def default_labels(
    model: HookedTransformer, fam: SiteFamily, tokens: Tensor, shape: Sequence[int] = ()
) -> dict[str, list[str]]:
    """Axis labels: layer numbers, positions named by the first prompt's tokens, and index
    numbers for the other axes (`shape`: the site axes' sizes, from `SiteFamily.site_shape`)."""
    labels = {"layer": [str(i) for i in fam.layer_list(model)]}
    sizes = dict(zip(fam.axes, shape))
    sizes.setdefault("head", model.cfg.n_heads)
    sizes.setdefault("neuron", model.cfg.d_mlp)
    for axis in fam.axes:
        if axis == "pos" and model.tokenizer is not None:
            labels["pos"] = [f"{i}:{model.tokenizer.decode([int(t)])}" for i, t in enumerate(tokens[0])]
        elif axis == "pos":
            labels["pos"] = [str(i) for i in range(tokens.shape[1])]
        elif axis in sizes:
            labels[axis] = [str(i) for i in range(sizes[axis])]
    return labels
