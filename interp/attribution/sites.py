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
| `q_input`      | `blocks.L.hook_q_input`     | layer, head          | a head's query input, all pos.  |
| `k_input`      | `blocks.L.hook_k_input`     | layer, head          | a head's key input, all pos.    |
| `v_input`      | `blocks.L.hook_v_input`     | layer, head          | a head's value input, all pos.  |
| `q_input_by_pos` (`k_`, `v_`) | as above     | layer, pos, head     | that input at one position      |

**Query, key and value inputs.** TransformerLens's `use_split_qkv_input` gives every head its
own copy of the residual stream for its queries, keys and values (`[batch, pos, head,
d_model]`, before the layer's norm); patching one copy changes only that head's queries (or
keys, or values), which is what AtP* scores (Kramar et al. 2024). The hooks fire only with that
flag on, so every method runs these families inside `site_config(model, fams)`, which turns it
on (and restores it). Grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads;
Gemma 3 too): the key and value inputs are indexed by *query* head. Inside `site_config` the
model also runs with `ungroup_grouped_query_attention`, which computes each query head's keys
and values from its own input copy with the shared weights (the same numbers as the grouped
computation); patching head h's key input changes the keys that head h reads and leaves the
other heads of its group reading the target's keys. A key/value head's own effect (all heads of
its group patched together) is not a site here; it is not the sum of its query heads' effects
unless the effects are additive.

Every method (exact patching, AtP, AtP*, integrated gradients, RelP) takes family names, the
same clean/corrupt token batches and the same metric, and returns `Scores`: values with named
axes and labels, so any two methods compare one to one (`Scores.flat()`).

`Scores` answers queries by site number or label: `top(k)` (the largest sites as labelled
rows), `to_frame()` (a pandas table, one row per site), `sel(layer=..., pos=..., head=...)` (a
smaller `Scores`); `interp.plots.scores_heatmap` draws one. Position scores of batches that mix
templates read by named slot instead of raw index: `interp.attribution.slots.by_slot`.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.hooks import hook_family


@dataclass(frozen=True)
class SiteFamily:
    """A hook point per layer and the axes of its activation that index sites.

    Attributes:
        name: short name (`resid`, `attn`, `mlp`, `heads`, `heads_by_pos`, `neurons`,
            `q_input`, `k_input`, `v_input` and their `_by_pos` variants).
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

    @property
    def hook_family(self) -> str | None:
        """The `interp.hooks.HOOK_FAMILIES` name of the hook point (`"resid_pre"`, `"z"`,
        `"q_input"`, ...), None for other hook points (an SAE's latents)."""
        return hook_family(self.hook)

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
        *[SiteFamily(f"{x}_input", f"blocks.{{L}}.hook_{x}_input", ("head",),
                     ("batch", "pos", "head", "d_model")) for x in "qkv"],
        *[SiteFamily(f"{x}_input_by_pos", f"blocks.{{L}}.hook_{x}_input", ("pos", "head"),
                     ("batch", "pos", "head", "d_model")) for x in "qkv"],
    ]
}

#: Hook-name endings of the split query/key/value inputs (they fire only under `site_config`).
QKV_INPUT_HOOKS = ("hook_q_input", "hook_k_input", "hook_v_input")


def qkv_input_of(fam: SiteFamily) -> str | None:
    """`"q"`, `"k"` or `"v"` for a family on a head's split query/key/value input, else None."""
    return {"q_input": "q", "k_input": "k", "v_input": "v"}.get(fam.hook_family or "")


@contextmanager
def site_config(model: HookedTransformer, fams: Sequence[SiteFamily]) -> Iterator[HookedTransformer]:
    """Within the context the model's hooks for `fams` fire: for families on split query, key or
    value inputs (`qkv_input_of`) `use_split_qkv_input` is on, and under grouped-query attention
    `ungroup_grouped_query_attention` too (key/value inputs per query head; see the module
    notes). Other families change nothing. The flags are restored on exit; the forward values
    equal the plain model's up to floating-point rounding."""
    cfg = model.cfg
    if not any(qkv_input_of(f) for f in fams):
        yield model
        return
    flags = {"use_split_qkv_input": True}
    if cfg.n_key_value_heads is not None:
        flags["ungroup_grouped_query_attention"] = True
    saved = {k: getattr(cfg, k) for k in flags}
    try:
        for k, v in flags.items():
            setattr(cfg, k, v)
        yield model
    finally:
        for k, v in saved.items():
            setattr(cfg, k, v)


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


#: Axes whose labels are names, not numbers (`slot`: IO, S1, ...); every other axis numbers its
#: sites (layer, position, head, neuron, latent, prompt).
NAMED_AXES = ("slot",)

#: How `Scores.site_labels` prefixes each axis.
_PREFIX = {"layer": "L", "pos": "pos", "head": "H", "neuron": "N", "latent": "F", "prompt": "P",
           "slot": ""}

#: What `Scores.sel` takes per axis: a site number (an int), a label (a str), several of them
#: (a list, a range), or a slice of site numbers.
Selector = Union[int, str, slice, Sequence[Union[int, str]]]


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
        numbers: the site number of each index along an axis, where it is not the index
            itself: set by `sel` (after `sel(pos=[3, 5])` index 0 is position 3). Layers are
            numbered by their labels (families may cover some layers only); see `axis_numbers`.

    Queries: `top(k)` (the largest sites as labelled rows), `to_frame()` (a pandas table, one
    row per site), `sel(layer=..., pos=..., head=...)` (a smaller `Scores`). Integers in
    queries are site numbers (layer 3, position 5, head 2), strings are labels (`"5: Mary"`,
    `"IO"` for slots).
    """

    family: str
    method: str
    values: Float[Tensor, "layer ..."]
    dims: tuple[str, ...]
    labels: dict[str, list[str]] = field(default_factory=dict)
    baseline: float = 0.0
    signed: bool = True
    numbers: dict[str, list[int]] = field(default_factory=dict)

    def flat(self) -> Float[Tensor, " sites"]:
        """Values flattened over sites, in the same order for every method of the family."""
        return self.values.detach().flatten().float().cpu()

    def axis_numbers(self, axis: str) -> list[int]:
        """The site number of each index along `axis`: the layer number for `layer` (from its
        labels), the index otherwise, unless `sel` kept only some (`numbers`). For named axes
        (`slot`) the index."""
        size = self.values.shape[self._axis(axis)]
        if axis in self.numbers:
            return list(self.numbers[axis])
        if axis == "layer" and len(self.labels.get("layer", [])) == size:
            try:
                return [int(x) for x in self.labels["layer"]]
            except ValueError:
                pass
        return list(range(size))

    def axis_labels(self, axis: str) -> list[str]:
        """A label per index along `axis` (its numbers as strings where it has no labels)."""
        labels = self.labels.get(axis)
        if labels is not None and len(labels) == self.values.shape[self._axis(axis)]:
            return list(labels)
        return [str(n) for n in self.axis_numbers(axis)]

    def site_labels(self) -> list[str]:
        """A label per flattened site, e.g. `L3 pos5`, `L3 H2` or `L3 IO` (numbers are site
        numbers: layer, position, head; slots by their name)."""
        parts = [[f"{_PREFIX.get(d, d)}{v}" for v in self._axis_values(d)] for d in self.dims]
        return [" ".join(parts[k][i] for k, i in enumerate(index)) for index in self._indices()]

    # -- queries ------------------------------------------------------------------------------

    def to_frame(self):
        """A pandas DataFrame with one row per site (in `flat()` order): one column per axis
        and `value`. Numbered axes hold site numbers (int); named axes (`slot`) their labels;
        an axis whose labels say more than its numbers (`pos`: `"5: Mary"`) gets a second
        column `<axis>_label`."""
        import pandas as pd

        return pd.DataFrame(self._rows(range(self.values.numel())), columns=self._columns())

    def top(self, k: int = 10, by: str = "abs") -> list[dict[str, int | str | float]]:
        """The `k` sites with the largest scores, largest first, each a row as in `to_frame`
        (`{"layer": 3, "head": 2, "value": 0.41}`; `pd.DataFrame(rows)` makes a table).

        Args:
            k: how many sites (fewer if there are fewer).
            by: `"abs"` (largest |value|), `"max"` (most positive) or `"min"` (most negative).
                Ties keep `flat()` order.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        keys = {"abs": lambda v: -v.abs(), "max": lambda v: -v, "min": lambda v: v}
        if by not in keys:
            raise ValueError(f"by must be one of {', '.join(map(repr, keys))}, got {by!r}")
        flat = self.flat()
        order = torch.sort(keys[by](flat), stable=True).indices[:k]
        return self._rows(order.tolist())

    def sel(self, **axes: Selector) -> Scores:
        """The scores of some sites only, as a smaller `Scores` with the same axes.

        Each keyword names an axis (`layer`, `pos`, `head`, `slot`, ...) and what to keep: a
        site number (`layer=3`, `pos=5`: the number, not the index, so a second `sel` means
        the same sites), a label (`pos="5: Mary"`, `slot="IO"`), a list or range of them (kept
        in the order given), or a slice of numbers (`layer=slice(2, 5)`: layers 2, 3, 4).
        An axis selected by one number keeps length 1 (`.values` stays `[layer, ...]`).
        """
        values, labels, numbers = self.values, dict(self.labels), dict(self.numbers)
        for axis, selector in axes.items():
            if axis not in self.dims:
                raise ValueError(f"these {self.family} scores have no axis {axis!r}; their axes "
                                 f"are {', '.join(self.dims)}")
            index = self._resolve(axis, selector)
            dim = self._axis(axis)
            values = values.index_select(dim, torch.tensor(index, device=values.device))
            if axis in self.labels:
                labels[axis] = [self.axis_labels(axis)[i] for i in index]
            if axis not in NAMED_AXES:
                numbers[axis] = [self.axis_numbers(axis)[i] for i in index]
        return replace(self, values=values, labels=labels, numbers=numbers)

    # -- helpers ------------------------------------------------------------------------------

    def _axis(self, axis: str) -> int:
        return self.dims.index(axis)

    def _axis_values(self, axis: str) -> list[int] | list[str]:
        """What identifies an index along `axis` in rows: its number, or its label if named."""
        return self.axis_labels(axis) if axis in NAMED_AXES else self.axis_numbers(axis)

    def _extra_labels(self) -> list[str]:
        """Numbered axes whose labels say more than their numbers (positions with tokens)."""
        return [d for d in self.dims if d not in NAMED_AXES and d in self.labels
                and self.axis_labels(d) != [str(n) for n in self.axis_numbers(d)]]

    def _columns(self) -> list[str]:
        extra = self._extra_labels()
        cols = []
        for d in self.dims:
            cols += [d, f"{d}_label"] if d in extra else [d]
        return [*cols, "value"]

    def _indices(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*[range(s) for s in self.values.shape]))

    def _rows(self, flat_indices: Sequence[int]) -> list[dict[str, int | str | float]]:
        extra = self._extra_labels()
        ids = {d: self._axis_values(d) for d in self.dims}
        names = {d: self.axis_labels(d) for d in extra}
        flat = self.flat()
        picked = torch.as_tensor(list(flat_indices), dtype=torch.long)
        coords = [c.tolist() for c in torch.unravel_index(picked, tuple(self.values.shape))]
        rows = []
        for k, value in enumerate(flat[picked].tolist()):
            row: dict[str, int | str | float] = {}
            for d, c in zip(self.dims, coords):
                row[d] = ids[d][c[k]]
                if d in extra:
                    row[f"{d}_label"] = names[d][c[k]]
            row["value"] = value
            rows.append(row)
        return rows

    def _resolve(self, axis: str, selector: Selector) -> list[int]:
        """Indices along `axis` of a selector (see `sel`); a ValueError naming what is missing."""
        numbers, labels = self.axis_numbers(axis), self.axis_labels(axis)
        named = axis in NAMED_AXES
        if isinstance(selector, slice):
            if named:
                return list(range(len(labels)))[selector] or self._none(axis, selector)
            start = -math.inf if selector.start is None else selector.start
            stop = math.inf if selector.stop is None else selector.stop
            step = selector.step or 1
            base = 0 if selector.start is None else selector.start
            index = [i for i, n in enumerate(numbers) if start <= n < stop and (n - base) % step == 0]
            return index or self._none(axis, selector)
        items = [selector] if isinstance(selector, (int, str)) else list(selector)
        index = []
        for item in items:
            if isinstance(item, str):
                found = [i for i, label in enumerate(labels) if label == item]
            elif named:
                found = [item] if 0 <= item < len(labels) else []
            else:
                found = [i for i, n in enumerate(numbers) if n == item]
            if not found:
                self._none(axis, item)
            index += found
        return index or self._none(axis, selector)

    def _none(self, axis: str, what: object) -> list[int]:
        shown = self.axis_labels(axis)
        more = ", ..." if len(shown) > 12 else ""
        raise ValueError(f"{axis} {what!r} selects nothing in these {self.family} scores; the "
                         f"{axis} labels are {', '.join(map(repr, shown[:12]))}{more} (integers "
                         f"select by number: {self.axis_numbers(axis)[:12]}{more})")


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
