"""Reusable hooks: steer, ablate a direction, patch from a cache, zero/mean/resample ablation,
capture.

Every hook here is one object that works two ways:

- **as a TransformerLens hook function** `fn(activation, hook) -> activation | None`, attached
  at each of its hook points by TransformerLens itself::

      h = hooks.steer(model, v, layers=[3])
      logits = model.run_with_hooks(tokens, fwd_hooks=h.fwd_hooks())

- **as a context manager** that attaches itself to the model on entry and, on exit, removes
  exactly the hooks it added (hooks attached by anyone else stay)::

      with hooks.steer(model, v, layers=[3, 4], positions=-1, scale=4.0), \\
           hooks.ablate_direction(model, d, layers="all"):
          logits = model(tokens)

Hooks on the same hook point run in the order they were attached, so the second context above
sees the activation the first one produced, and `capture` entered last records what the model
actually uses downstream.

**Which activations.** A hook is placed at a list of TransformerLens hook points, named by a
family short name plus `layers` (`"resid_pre"`, `"attn_out"`, `"z"`, `"mlp_post"`; see
`HOOK_FAMILIES`), a template (`"blocks.{L}.mlp.hook_post"`), a suffix (`"mlp.hook_post"`) or a
full name (`"blocks.3.hook_resid_pre"`); `hook_names()` does the resolution. Within each
activation a `Selection` chooses the entries the hook touches (positions, heads, neurons); all
other entries pass through bit for bit. Positions index the query axis of attention patterns.

**Positions and the KV cache.** Positions are *absolute* token positions of the whole sequence;
negative ones count from its end. In an ordinary forward pass that is just the activation's
position axis. When the model runs with a `past_kv_cache` (as `model.generate` does), each
forward pass sees only the new tokens: a hook *attached with the context manager* learns how
many tokens the cache already holds from a forward pre-hook on each `TransformerBlock` (it reads
`past_kv_cache_entry.past_keys.shape[1]`) and shifts its positions accordingly. So
`from_position=p` touches every token at position `p` or later, prompt and generated alike, and
gives the same result with and without the cache; `positions=-1` touches the newest token of
every forward pass. Positions already in the cache are never revisited (their keys and values
were computed when they were new). Two limits: in the plain-callable form (`fwd_hooks()`, or
`model.hooks(...)`) nothing tells the hook about the cache, so positions are relative to the
current forward pass; and hook points outside the blocks (`hook_embed`, `ln_final.*`) always
see offset 0. Positions are the same for every row of the batch: with left padding the same
index means different tokens in different rows. The one exception is a per-row
`from_position=[start_0, start_1, ...]` (None for a row left alone), which
`interp.generation.generate_with(..., start=...)` builds from positions within each prompt.
(Separately, TransformerLens 3.9's
`generate(use_past_kv_cache=True)` gives each new token the wrong learned position embedding
on models with `positional_embedding_type="standard"` such as GPT-2, so its greedy output
differs from repeated full forward passes there; rotary models are unaffected.)
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple, Union

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint, LensHandle

__all__ = [
    "HOOK_FAMILIES",
    "AblateDirection",
    "Capture",
    "Hook",
    "Patch",
    "Selection",
    "Steer",
    "ablate_direction",
    "capture",
    "hook_family",
    "hook_names",
    "mean_ablate",
    "patch",
    "resample_ablate",
    "resample_rows",
    "steer",
    "zero_ablate",
]

#: Short names of per-layer hook families, with the TransformerLens name template of each.
#: Shapes: residual-stream families `[batch, pos, d_model]`; `q k v z result rot_q rot_k`
#: `[batch, pos, head, d_head]` (`k v rot_k` have `n_key_value_heads` heads under GQA);
#: `attn_in q_input k_input v_input` `[batch, pos, head, d_model]`; `pattern attn_scores`
#: `[batch, head, query_pos, key_pos]`; `mlp_pre mlp_pre_linear mlp_post` `[batch, pos, d_mlp]`.
HOOK_FAMILIES: dict[str, str] = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "attn_in": "blocks.{L}.hook_attn_in",
    "q_input": "blocks.{L}.hook_q_input",
    "k_input": "blocks.{L}.hook_k_input",
    "v_input": "blocks.{L}.hook_v_input",
    "mlp_in": "blocks.{L}.hook_mlp_in",
    "q": "blocks.{L}.attn.hook_q",
    "k": "blocks.{L}.attn.hook_k",
    "v": "blocks.{L}.attn.hook_v",
    "z": "blocks.{L}.attn.hook_z",
    "result": "blocks.{L}.attn.hook_result",
    "rot_q": "blocks.{L}.attn.hook_rot_q",
    "rot_k": "blocks.{L}.attn.hook_rot_k",
    "pattern": "blocks.{L}.attn.hook_pattern",
    "attn_scores": "blocks.{L}.attn.hook_attn_scores",
    "mlp_pre": "blocks.{L}.mlp.hook_pre",
    "mlp_pre_linear": "blocks.{L}.mlp.hook_pre_linear",
    "mlp_post": "blocks.{L}.mlp.hook_post",
}

#: Hook points that only fire when a config flag is on (TransformerLens asserts on them).
_NEEDS_FLAG = {
    "attn.hook_result": "use_attn_result",
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "hook_mlp_in": "use_hook_mlp_in",
    "hook_attn_in": "use_attn_in",
}
_TOP_LEVEL_PREFIXES = ("hook_embed", "hook_pos_embed", "hook_tokens", "ln_final.", "unembed.")
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")

Layers = Union[int, Sequence[int], Literal["all"], None]
Positions = Union[int, Sequence[int], slice, Int[Tensor, " n"], None]
FromPosition = Union[int, Sequence[Union[int, None]], Int[Tensor, " batch"], None]
Indices = Union[int, Sequence[int], Int[Tensor, " n"], None]
Source = Union[ActivationCache, Mapping[str, Tensor]]


# --------------------------------------------------------------------------------------------
# Hook names
# --------------------------------------------------------------------------------------------


def hook_names(
    model: HookedRootModule | None,
    hooks: str | Sequence[str],
    layers: Layers = "all",
) -> list[str]:
    """Resolve hook families and layers to TransformerLens hook-point names.

    Each item of `hooks` is one of: a short family name from `HOOK_FAMILIES` (`"resid_pre"`,
    `"z"`, `"mlp_post"`, ...), a template with `{L}` (`"blocks.{L}.ln2.hook_normalized"`), a
    suffix inside a block (`"mlp.hook_post"`, `"hook_resid_pre"`), or a full hook name
    (`"blocks.3.attn.hook_z"`, `"hook_embed"`), which is used as it is. Names come out
    layer-major: for `hooks=("resid_pre", "attn_out")`, `layers=[0, 1]` they are resid_pre 0,
    attn_out 0, resid_pre 1, attn_out 1.

    Args:
        model: the model, used to resolve `"all"` and negative layers and to check that every
            name is a hook point that fires. May be None when the names are full names or the
            layers are explicit non-negative ints.
        hooks: one item or a sequence of items as above.
        layers: `"all"`, an int or a sequence of ints (negative ones count from the last layer).
            Applies to the family/template/suffix items; giving explicit layers with only full
            names is an error (it would be silently ignored).

    Returns:
        The hook-point names, without duplicates.

    Raises:
        ValueError: unknown family (the message lists the known ones); layer out of range (the
            message gives the model's n_layers); a name the model has no hook point for; a hook
            point that needs a config flag which is off.
    """
    items = [hooks] if isinstance(hooks, str) else list(hooks)
    if not items:
        raise ValueError("no hooks given")
    templates: list[str | None] = [_template(item, model) for item in items]
    if all(t is None for t in templates):
        if layers not in (None, "all"):
            raise ValueError(
                f"layers={layers!r} was given but every hook is a full hook name ({items}); "
                "pass layers=None, or use a family name such as 'resid_pre'"
            )
        names = list(items)
    else:
        layer_list = _resolve_layers(model, layers)
        names = []
        for layer in layer_list:
            for item, template in zip(items, templates):
                names.append(item if template is None else template.format(L=layer))
        names += [item for item, t in zip(items, templates) if t is None and item not in names]
    names = list(dict.fromkeys(names))
    if model is not None:
        _check_names(model, names)
    return names


def _template(item: str, model: HookedRootModule | None) -> str | None:
    """The `{L}` template for a family/template/suffix item, None for a full hook name."""
    if not isinstance(item, str):
        raise TypeError(f"hook names must be strings, got {type(item).__name__}: {item!r}")
    if "{L}" in item:
        return item
    if item in HOOK_FAMILIES:
        return HOOK_FAMILIES[item]
    if (
        _LAYER_RE.match(item)
        or item.startswith(_TOP_LEVEL_PREFIXES)
        or (model is not None and item in model.hook_dict)
    ):
        return None
    if item.startswith("hook_") or ".hook_" in item:
        return "blocks.{L}." + item
    raise ValueError(
        f"unknown hook family {item!r}; known families: {', '.join(HOOK_FAMILIES)} "
        "(or pass a template such as 'blocks.{L}.mlp.hook_post', a suffix such as "
        "'mlp.hook_post', or a full hook name)"
    )


def _resolve_layers(model: HookedRootModule | None, layers: Layers) -> list[int]:
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    if layers is None:
        raise ValueError("layers must be given for hook families: 'all', an int or a list of ints")
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all', an int or a list of ints, got {layers!r}")
        if n_layers is None:
            raise ValueError("layers='all' needs the model (to know n_layers)")
        return list(range(n_layers))
    if isinstance(layers, Tensor):
        layers = layers.tolist()
    items = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layers must be ints, got {layer!r}")
        if n_layers is None:
            if layer < 0:
                raise ValueError(f"negative layer {layer} needs the model (to know n_layers)")
        elif not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has n_layers={n_layers}")
        out.append(layer % n_layers if n_layers else layer)
    if len(set(out)) != len(out):
        raise ValueError(f"layers contains duplicates: {items}")
    if not out:
        raise ValueError("layers is empty")
    return out


def _check_names(model: HookedRootModule, names: Sequence[str]) -> None:
    for name in names:
        if name not in model.hook_dict:
            close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"the model has no hook point {name!r}{hint}")
        for suffix, flag in _NEEDS_FLAG.items():
            if name.endswith(suffix) and not getattr(model.cfg, flag, False):
                raise ValueError(
                    f"hook point {name!r} only fires when model.cfg.{flag} is True "
                    f"(turn it on with model.set_{flag}(True))"
                )


def _layer_of(name: str) -> int | None:
    match = _LAYER_RE.match(name)
    return int(match.group(1)) if match else None


_FAMILY_OF_TEMPLATE = {template: family for family, template in HOOK_FAMILIES.items()}


def hook_family(name: str) -> str | None:
    """The `HOOK_FAMILIES` short name of a hook-point name or `{L}` template, else None.

    `"blocks.3.attn.hook_z"` and `"blocks.{L}.attn.hook_z"` are `"z"`,
    `"blocks.0.hook_resid_pre"` is `"resid_pre"`. Only exact members of a family count: hook
    points nested below one (`"blocks.3.hook_resid_pre.hook_sae_acts_post"`, an SAE's latents)
    and names outside the blocks (`"hook_embed"`) give None. Code that must know what kind of
    activation a hook point carries (its axes, its width) asks this registry instead of
    testing the name's text.
    """
    return _FAMILY_OF_TEMPLATE.get(_LAYER_RE.sub("blocks.{L}.", name, count=1))


# --------------------------------------------------------------------------------------------
# Selection: which entries of an activation a hook touches
# --------------------------------------------------------------------------------------------


class _Layout(NamedTuple):
    """Where the position, head and neuron axes of an activation are."""

    ndim: int
    pos: int  # query positions for attention patterns
    head: int | None
    neuron: int | None


_BPD = _Layout(3, pos=1, head=None, neuron=2)  # [batch, pos, d]
_BPHD = _Layout(4, pos=1, head=2, neuron=None)  # [batch, pos, head, d]
_BHQK = _Layout(4, pos=2, head=1, neuron=None)  # [batch, head, query_pos, key_pos]
_BP = _Layout(2, pos=1, head=None, neuron=None)  # [batch, pos]
# Per-head families whose last axis is d_head, and those whose last axis is d_model.
_D_HEAD_SUFFIXES = tuple(
    HOOK_FAMILIES[f].removeprefix("blocks.{L}.")
    for f in ("q", "k", "v", "z", "result", "rot_q", "rot_k")
)
_HEAD_SUFFIXES = _D_HEAD_SUFFIXES + tuple(
    HOOK_FAMILIES[f].removeprefix("blocks.{L}.")
    for f in ("attn_in", "q_input", "k_input", "v_input")
)
_PATTERN_SUFFIXES = ("attn.hook_pattern", "attn.hook_attn_scores")


def _layout(name: str, ndim: int | None = None) -> _Layout:
    if name.endswith(_PATTERN_SUFFIXES):
        layout = _BHQK
    elif name.endswith(_HEAD_SUFFIXES):
        layout = _BPHD
    elif ndim is None or ndim == 3:
        layout = _BPD
    else:
        layout = {2: _BP, 4: _BPHD}.get(ndim, _BPD)
    if ndim is not None and ndim != layout.ndim:
        raise ValueError(
            f"activation at {name!r} has {ndim} dimensions; expected {layout.ndim} for this hook"
        )
    return layout


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.ndim > 1:
            raise ValueError(f"{what} must be an int, a list of ints or a 1-D int tensor")
        value = value.tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    raise ValueError(f"{what} must be an int, a list of ints or a 1-D int tensor, got {value!r}")


@dataclass(frozen=True)
class Selection:
    """Which entries of an activation a hook touches; all other entries pass through unchanged.

    The parts combine by intersection: `positions=[3], heads=[1]` is head 1 at position 3.

    Attributes:
        positions: absolute token positions (query positions for attention patterns): None for
            all, an int, a sequence of ints, a slice or a 1-D int tensor. Negative values count
            from the end of the whole sequence (cached tokens included, see the module
            docstring). An int position outside the sequence is an error, except while a KV
            cache is in use: a position past the current end is skipped, since a later
            forward pass may reach it.
        heads: head indices on the head axis (`z q k v result rot_q rot_k attn_in *_input`
            `[batch, pos, head, d]`, `pattern attn_scores` `[batch, head, q, k]`).
        neurons: indices on the last axis of a `[batch, pos, d]` activation (`mlp_post` neurons,
            or residual-stream dimensions).
        from_position: touch every position at or after this one (an alternative to
            `positions`, which must then be None). Meant for generation: the threshold is
            absolute, so newly generated tokens are included as they come. Either one int for
            every row, or a *per-row* sequence `[start_0, start_1, ...]` with one entry per
            batch row: row `b` is touched from position `start_b` on, and a None entry leaves
            that row untouched (a control row in the same batch). Per-row starts are positions
            in the frame the model sees, so under left padding they include each row's pads
            (`interp.generation` converts positions within each prompt for you); the
            activation's batch must have as many rows as there are entries.
    """

    positions: Positions = None
    heads: Indices = None
    neurons: Indices = None
    from_position: FromPosition = None

    def __post_init__(self) -> None:
        if self.positions is not None and self.from_position is not None:
            raise ValueError("give positions or from_position, not both")
        start = self.from_position
        if isinstance(start, Tensor):
            if start.dtype.is_floating_point or start.dtype == torch.bool or start.ndim != 1:
                raise ValueError("a per-row from_position tensor must be 1-D ints")
            start = start.tolist()
        if start is not None and not _is_int(start):
            if not isinstance(start, Sequence) or isinstance(start, str) or not all(
                s is None or _is_int(s) for s in start
            ):
                raise ValueError(
                    "from_position must be an int or a per-row sequence of ints and Nones, got "
                    f"{self.from_position!r}"
                )
            object.__setattr__(self, "from_position", tuple(start))
        if not isinstance(self.positions, slice):
            object.__setattr__(self, "positions", _as_int_tuple(self.positions, "positions"))
        object.__setattr__(self, "heads", _as_int_tuple(self.heads, "heads"))
        object.__setattr__(self, "neurons", _as_int_tuple(self.neurons, "neurons"))

    @property
    def everything(self) -> bool:
        """True when nothing is restricted (the hook touches the whole activation)."""
        return (
            self.positions is None
            and self.heads is None
            and self.neurons is None
            and self.from_position is None
        )

    def check(self, names: Sequence[str]) -> None:
        """Raise ValueError when `heads`/`neurons` are asked of hook points without that axis."""
        for name in names:
            layout = _layout(name)
            if self.heads is not None and layout.head is None:
                raise ValueError(
                    f"heads= needs hook points with a head axis (z, q, k, v, result, rot_q, "
                    f"rot_k, pattern, attn_scores, ...); {name!r} has none"
                )
            if self.neurons is not None and layout.neuron is None:
                raise ValueError(
                    f"neurons= indexes the last axis of [batch, pos, d] activations (mlp_post, "
                    f"resid_pre, ...); {name!r} is not one (use heads= for per-head hooks)"
                )

    def mask(
        self, act: Tensor, name: str, offset: int = 0, strict: bool = True
    ) -> Bool[Tensor, "..."] | None:
        """Boolean mask broadcastable to `act` (True = touched), or None for everything.

        Args:
            act: the activation at hook point `name`.
            name: its hook-point name (decides which axes are positions and heads).
            offset: number of tokens already in the KV cache before this forward pass.
            strict: raise for a non-negative position past the end of the sequence. Off while
                a KV cache is in use, where such positions may still come (they are skipped).
        """
        if self.everything:
            return None
        layout = _layout(name, act.ndim)
        mask = torch.ones([1] * act.ndim, dtype=torch.bool, device=act.device)
        if self.per_row:
            keep = self._row_position_mask(act.shape[0], act.shape[layout.pos], offset, name)
            shape = [1] * act.ndim
            shape[0], shape[layout.pos] = keep.shape
            mask = mask & keep.to(act.device).view(shape)
        elif self.positions is not None or self.from_position is not None:
            keep = self._position_mask(act.shape[layout.pos], offset, name, strict)
            mask = mask & _along(keep, layout.pos, act)
        if self.heads is not None:
            assert layout.head is not None
            keep = _index_mask(self.heads, act.shape[layout.head], "head", name)
            mask = mask & _along(keep, layout.head, act)
        if self.neurons is not None:
            assert layout.neuron is not None
            keep = _index_mask(self.neurons, act.shape[layout.neuron], "neuron", name)
            mask = mask & _along(keep, layout.neuron, act)
        return mask

    @property
    def per_row(self) -> bool:
        """True when `from_position` gives one start per batch row."""
        return isinstance(self.from_position, tuple)

    def _position_mask(
        self, seq: int, offset: int, name: str, strict: bool
    ) -> Bool[Tensor, " seq"]:
        total = offset + seq
        if self.from_position is not None:
            assert isinstance(self.from_position, int)
            start = self.from_position if self.from_position >= 0 else total + self.from_position
            absolute = torch.arange(min(max(start, 0), total), total)
        elif isinstance(self.positions, slice):
            absolute = torch.arange(total)[self.positions]
        else:
            assert self.positions is not None
            for p in self.positions:
                if p < -total or (strict and p >= total):
                    raise ValueError(
                        f"position {p} is out of range for {name!r}: the sequence has "
                        f"{total} tokens"
                    )
            absolute = torch.tensor(self.positions, dtype=torch.long)
            absolute = torch.where(absolute < 0, absolute + total, absolute)
            absolute = absolute[absolute < total]
        local = absolute[absolute >= offset] - offset
        keep = torch.zeros(seq, dtype=torch.bool)
        keep[local] = True
        return keep


    def _row_position_mask(
        self, batch: int, seq: int, offset: int, name: str
    ) -> Bool[Tensor, "batch seq"]:
        """Per-row starts: True at `[b, p]` when absolute position `offset + p` >= row b's start."""
        starts = self.from_position
        assert isinstance(starts, tuple)
        if len(starts) != batch:
            raise ValueError(
                f"from_position gives {len(starts)} per-row starts, but the activation at "
                f"{name!r} has {batch} rows; give one start (or None) per row of the batch"
            )
        total = offset + seq
        # A row without a start never reaches it: use a threshold past the end of the sequence.
        bound = torch.tensor(
            [total if s is None else (s if s >= 0 else total + s) for s in starts],
            dtype=torch.long,
        )
        return torch.arange(offset, total)[None, :] >= bound[:, None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index_mask(indices: tuple[int, ...], size: int, what: str, name: str) -> Bool[Tensor, " n"]:
    for i in indices:
        if not -size <= i < size:
            raise ValueError(f"{what} {i} is out of range for {name!r}, which has {size} {what}s")
    keep = torch.zeros(size, dtype=torch.bool)
    keep[list(indices)] = True
    return keep


def _along(keep: Bool[Tensor, " n"], axis: int, act: Tensor) -> Tensor:
    """`keep` reshaped to lie along `axis` of a tensor shaped like `act`, on its device."""
    shape = [1] * act.ndim
    shape[axis] = keep.shape[0]
    return keep.to(act.device).view(shape)


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------


class Hook:
    """A forward hook placed at a list of hook points; usable as a function or a context manager.

    Subclasses implement `_edit(act, name, offset)`, returning the new values (anything that
    broadcasts to `act`); the base class keeps the entries outside `selection` as they were,
    casts back to the activation's dtype and returns the result. A hook returns a new tensor;
    it never writes into the activation in place.

    Attributes:
        hook_names: the TransformerLens hook points this hook is placed at.
        model: the model given to the factory (None when built from explicit names).
        selection: which entries of each activation are touched.
    """

    def __init__(
        self,
        hook_names: Sequence[str],
        model: HookedRootModule | None = None,
        selection: Selection | None = None,
    ) -> None:
        if not hook_names:
            raise ValueError("no hook points selected")
        self.hook_names = list(hook_names)
        self.model = model
        self.selection = selection if selection is not None else Selection()
        self.selection.check(self.hook_names)
        self._handles: list[tuple[HookPoint, LensHandle]] = []
        self._block_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._offsets: dict[int, tuple[int, bool]] = {}  # layer -> (cached tokens, KV cache?)

    # -- as a TransformerLens hook function --------------------------------------------------

    def __call__(self, activation: Tensor, hook: HookPoint) -> Tensor | None:
        """The TransformerLens hook function: the edited activation, same shape and dtype."""
        name = hook.name
        assert name is not None
        layer = _layer_of(name)
        offset, cached = self._offsets.get(layer, (0, False)) if layer is not None else (0, False)
        new = self._edit(activation, name, offset)
        mask = self.selection.mask(activation, name, offset, strict=not cached)
        new = new.to(activation.dtype)
        if mask is None:
            return new if new.shape == activation.shape else new.expand(activation.shape).clone()
        return torch.where(mask, new, activation)

    def _edit(self, act: Tensor, name: str, offset: int) -> Tensor:
        raise NotImplementedError

    def fwd_hooks(self) -> list[tuple[str, Hook]]:
        """`[(hook_name, self), ...]` for `model.run_with_hooks(fwd_hooks=...)`/`model.hooks()`.

        In this form the hook does not know about a KV cache (see the module docstring).
        """
        return [(name, self) for name in self.hook_names]

    # -- as a context manager ----------------------------------------------------------------

    def attach(self, model: HookedRootModule | None = None) -> Hook:
        """Add this hook at its hook points of `model` (default: the factory's model).

        The hook is added after any hooks already there, so it runs after them. Also adds a
        forward pre-hook to each `TransformerBlock` it needs, to learn the KV-cache offset.
        Prefer the `with` form, which always detaches.

        Returns:
            self.

        Raises:
            ValueError: no model; a hook name the model does not have.
            RuntimeError: already attached.
        """
        model = model if model is not None else self.model
        if model is None:
            raise ValueError(
                f"{type(self).__name__} was built without a model: pass one to attach(model), "
                "or use fwd_hooks() with model.run_with_hooks"
            )
        if self._handles:
            raise RuntimeError(f"{self!r} is already attached; detach it first")
        _check_names(model, self.hook_names)
        try:
            for name in self.hook_names:
                hook_point = model.hook_dict[name]
                model.add_hook(name, self)
                # HookPoint.add_hook returns nothing; it appends a LensHandle whose `user_hook`
                # is the callable we passed.
                handle = next(
                    h
                    for h in reversed(hook_point.fwd_hooks)
                    if getattr(h, "user_hook", self) is self
                )
                self._handles.append((hook_point, handle))
            blocks = getattr(model, "blocks", None)
            for layer in sorted({_layer_of(n) for n in self.hook_names} - {None}):
                if blocks is None or layer >= len(blocks):
                    continue
                block = blocks[layer]
                params = list(inspect.signature(block.forward).parameters)
                if "past_kv_cache_entry" not in params:
                    continue
                record = partial(self._record_offset, layer, params.index("past_kv_cache_entry"))
                self._block_handles.append(
                    block.register_forward_pre_hook(record, with_kwargs=True)
                )
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove exactly the hooks `attach` added (a no-op when not attached)."""
        for hook_point, handle in self._handles:
            handle.hook.remove()
            for i, h in enumerate(hook_point.fwd_hooks):
                if h is handle:  # identity: model.reset_hooks() may have dropped it already
                    del hook_point.fwd_hooks[i]
                    break
        for block_handle in self._block_handles:
            block_handle.remove()
        self._handles, self._block_handles, self._offsets = [], [], {}

    @property
    def attached(self) -> bool:
        """Whether the hook is currently attached by `attach`/`with`."""
        return bool(self._handles)

    def __enter__(self) -> Hook:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _record_offset(
        self, layer: int, arg_index: int, module: Any, args: tuple, kwargs: dict
    ) -> None:
        entry = kwargs.get("past_kv_cache_entry")
        if entry is None and len(args) > arg_index:
            entry = args[arg_index]
        self._offsets[layer] = (
            (int(entry.past_keys.shape[1]), True) if entry is not None else (0, False)
        )

    def __repr__(self) -> str:
        # TransformerLens calls repr() on every add_hook; keep it cheap (no tensors).
        names = self.hook_names
        if len(names) <= 3:
            where = ", ".join(names)
        else:
            where = f"{names[0]}, ... ({len(names)} hook points)"
        return f"{type(self).__name__}({where})"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision activations, else the activation's own dtype."""
    return torch.promote_types(dtype, torch.float32)


def _per_hook_rows(
    tensor: Tensor, names: Sequence[str], what: str, expected: int | None, expected_what: str
) -> dict[str, Tensor]:
    """Map each hook name to its row of a `[d]` or per-layer `[n_layers_chosen, d]` tensor.

    Rows of a 2-D tensor follow the chosen layers in the order they first appear in `names`.
    """
    if tensor.ndim not in (1, 2):
        raise ValueError(
            f"{what} must have shape [d] or [n_layers_chosen, d], got {tuple(tensor.shape)}"
        )
    if expected is not None and tensor.shape[-1] != expected:
        raise ValueError(
            f"{what} has size {tensor.shape[-1]} in its last dimension, expected "
            f"{expected_what}={expected}"
        )
    if tensor.ndim == 1:
        return {name: tensor for name in names}
    layers = list(dict.fromkeys(_layer_of(n) for n in names))
    if None in layers:
        raise ValueError(f"a per-layer {what} needs hook points inside blocks, got {names}")
    if tensor.shape[0] != len(layers):
        raise ValueError(
            f"per-layer {what} has {tensor.shape[0]} rows, expected one per chosen layer: "
            f"{len(layers)} (layers {layers})"
        )
    return {name: tensor[layers.index(_layer_of(name))] for name in names}


def _fits_last_dim(vector: Tensor, act: Tensor, name: str, what: str) -> Tensor:
    """`vector` if its size matches the activation's last axis; a ValueError naming both if not."""
    if vector.shape[-1] != act.shape[-1]:
        raise ValueError(
            f"{what} has size {vector.shape[-1]}, but the activation at {name!r} has "
            f"{act.shape[-1]} in its last dimension (shape {tuple(act.shape)})"
        )
    return vector


def _last_dim(model: HookedRootModule | None, names: Sequence[str]) -> tuple[int | None, str]:
    """The last-axis size every hook point in `names` shares (from the config), if known."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return None, ""
    sizes = set()
    for name in names:
        if name.endswith(("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear")):
            sizes.add(("d_mlp", cfg.d_mlp))
        elif name.endswith(_PATTERN_SUFFIXES):
            return None, ""
        elif name.endswith(_D_HEAD_SUFFIXES):
            sizes.add(("d_head", cfg.d_head))
        else:
            sizes.add(("d_model", cfg.d_model))
    if len(sizes) != 1:
        return None, ""
    label, size = sizes.pop()
    return size, label


# --------------------------------------------------------------------------------------------
# Steering
# --------------------------------------------------------------------------------------------


class Steer(Hook):
    """Add `scale * vector` to the activation at the selected entries (see `steer`)."""

    def __init__(
        self,
        hook_names: Sequence[str],
        vector: Float[Tensor, " d"] | Float[Tensor, "n_layers_chosen d"],
        scale: float = 1.0,
        selection: Selection | None = None,
        model: HookedRootModule | None = None,
    ) -> None:
        super().__init__(hook_names, model, selection)
        vector = torch.as_tensor(vector)
        expected, label = _last_dim(model, self.hook_names)
        self.vectors = _per_hook_rows(vector, self.hook_names, "vector", expected, label)
        self.scale = scale

    def _edit(
        self, act: Float[Tensor, "batch pos d"], name: str, offset: int
    ) -> Float[Tensor, "batch pos d"]:
        vector = _fits_last_dim(self.vectors[name], act, name, "vector")
        dtype = _compute_dtype(act.dtype)
        return act.to(dtype) + self.scale * vector.to(act.device, dtype)


def steer(
    model: HookedRootModule | None,
    vector: Float[Tensor, " d_model"] | Float[Tensor, "n_layers_chosen d_model"],
    layers: Layers,
    positions: Positions = None,
    scale: float = 1.0,
    hook: str | Sequence[str] = "resid_pre",
    from_position: FromPosition = None,
) -> Steer:
    """Activation steering: add `scale * vector` to an activation at chosen layers and positions.

    The classic use adds a concept or behaviour direction (a difference of means, a probe
    weight, an SAE decoder row) to the residual stream, `x <- x + scale * v`, at one or a few
    layers. The sum is computed in float32 for half-precision models and cast back. Gradients
    flow into `vector` if it requires grad (for learned steering vectors).

    Caveats: the effect of a given `scale` depends on the residual norm at that layer, which
    grows with depth, so compare scales relative to `x.norm(dim=-1)`. With LayerNorm models
    loaded with weight processing, the next LayerNorm removes the component of `vector` along
    the all-ones direction (mean-centring), and any norm rescales the sum. Steering
    `resid_pre` of layer L and `resid_post` of layer L-1 is the same thing.

    Args:
        model: the model (resolves `layers`, checks sizes, needed for the `with` form), or None
            with full hook names in `hook`.
        vector: `[d_model]`, the same at every chosen layer, or `[n_layers_chosen, d_model]`,
            one row per chosen layer in the order of `layers`. Other hook families with a
            different last axis (`z`: d_head, `mlp_post`: d_mlp) take vectors of that size.
        layers: `"all"`, an int, or a list of ints; None when `hook` holds full names.
        positions: None (all), an int, a list of ints, a slice; negative values count from the
            end (see the module docstring for the KV cache).
        scale: multiplier of `vector`.
        hook: hook family, template or full name(s): `"resid_pre"` (default), `"resid_post"`,
            `"attn_out"`, `"mlp_out"`, ...
        from_position: steer this position and every later one instead of `positions`; the
            natural choice while generating (with or without KV cache).

    Returns:
        A `Steer` hook (a hook function and a context manager).

    Raises:
        ValueError: wrong vector size (expected vs got), wrong number of per-layer rows,
            unknown hook family, layer out of range.

    Example:
        >>> with steer(model, v, layers=[3, 4], positions=slice(-1, None), scale=4.0):
        ...     logits = model(tokens)
    """
    names = hook_names(model, hook, layers)
    selection = Selection(positions=positions, from_position=from_position)
    return Steer(names, vector, scale=scale, selection=selection, model=model)


# --------------------------------------------------------------------------------------------
# Directional ablation
# --------------------------------------------------------------------------------------------


class AblateDirection(Hook):
    """Project a direction out of the activation at the selected entries (see
    `ablate_direction`)."""

    def __init__(
        self,
        hook_names: Sequence[str],
        direction: Float[Tensor, " d"] | Float[Tensor, "n_layers_chosen d"],
        selection: Selection | None = None,
        model: HookedRootModule | None = None,
    ) -> None:
        super().__init__(hook_names, model, selection)
        direction = torch.as_tensor(direction)
        expected, label = _last_dim(model, self.hook_names)
        self.directions = _per_hook_rows(direction, self.hook_names, "direction", expected, label)
        if any(bool((d == 0).all()) for d in self.directions.values()):
            raise ValueError("direction is zero: it cannot be normalised")

    def _edit(
        self, act: Float[Tensor, "batch pos d"], name: str, offset: int
    ) -> Float[Tensor, "batch pos d"]:
        direction = _fits_last_dim(self.directions[name], act, name, "direction")
        dtype = _compute_dtype(act.dtype)
        x = act.to(dtype)
        unit = direction.to(act.device, dtype)
        unit = unit / unit.norm()
        component = einops.einsum(x, unit, "... d, d -> ...")
        return x - einops.einsum(component, unit, "..., d -> ... d")


def ablate_direction(
    model: HookedRootModule | None,
    direction: Float[Tensor, " d_model"] | Float[Tensor, "n_layers_chosen d_model"],
    layers: Layers = "all",
    hooks: str | Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    positions: Positions = None,
    from_position: FromPosition = None,
) -> AblateDirection:
    """Directional ablation: remove the component along `direction`, `x <- x - (x . d) d`.

    `d = direction / |direction|`. This is the inference-time intervention of Arditi et al.
    (2024), "Refusal in language models is mediated by a single direction": with the default
    hooks (`resid_pre`, `attn_out` and `mlp_out` of every layer) the direction is taken out of
    the residual stream at the input of every block and out of every component's write to it,
    so no layer can read or write along it. It equals orthogonalising every weight matrix that
    writes to the residual stream against `d` (plus the embedding, via `resid_pre` of layer 0).

    The projection is computed in float32 for half-precision activations and cast back, so in
    bfloat16 the remaining component is bfloat16 rounding noise (~1e-2 of the norm), not zero.
    Under LayerNorm the ablated residual is not re-centred; removing a direction with a mean
    component shifts the mean, which the next LayerNorm removes.

    Args:
        model: the model, or None with full hook names in `hooks`.
        direction: `[d_model]`, or `[n_layers_chosen, d_model]` with one direction per chosen
            layer (each used at all of that layer's hook points). Need not be normalised.
        layers: `"all"` (default), an int, or a list of ints.
        hooks: hook families or names to ablate at.
        positions: None (all), an int, a list of ints, a slice.
        from_position: ablate this position and every later one instead.

    Returns:
        An `AblateDirection` hook.

    Raises:
        ValueError: wrong direction size, zero direction, unknown hook family, bad layer.
    """
    names = hook_names(model, hooks, layers)
    selection = Selection(positions=positions, from_position=from_position)
    return AblateDirection(names, direction, selection=selection, model=model)


# --------------------------------------------------------------------------------------------
# Patching and zero / mean / resample ablation
# --------------------------------------------------------------------------------------------


class Patch(Hook):
    """Replace the selected entries with values from a per-hook-point table.

    `values[name]` is a tensor shaped like the activation at `name` (batch 1 broadcasts to
    any batch) or a number. Zero, mean and resample ablation are all this class with different
    tables; see `patch`, `zero_ablate`, `mean_ablate`, `resample_ablate`. It is also the patch
    primitive of the attribution methods: with no selection and a value of the activation's
    shape, dtype and device, the hook returns that very tensor, so a leaf made with
    `requires_grad_(True)` (an integrated-gradients interpolation point) reaches the model as it
    is and gradients can be taken with respect to it.

    Attributes:
        values: the replacement for each hook point.
        broadcast: whether non-batch axes of size 1 broadcast (means over positions); when
            False they must match the activation exactly.
        source_rows: for resample ablation, the source row used for each target row.
    """

    def __init__(
        self,
        hook_names: Sequence[str],
        values: Mapping[str, Tensor | float],
        selection: Selection | None = None,
        model: HookedRootModule | None = None,
        broadcast: bool = False,
        what: str = "patch source",
    ) -> None:
        super().__init__(hook_names, model, selection)
        missing = [n for n in self.hook_names if n not in values]
        if missing:
            raise ValueError(f"{what} has no values for {missing}")
        self.values = dict(values)
        self.broadcast = broadcast
        self.what = what
        self.source_rows: Int[Tensor, " batch"] | None = None

    def _edit(self, act: Tensor, name: str, offset: int) -> Tensor:
        value = self.values[name]
        if not isinstance(value, Tensor):
            return torch.full((), value, dtype=act.dtype, device=act.device)
        layout = _layout(name, act.ndim)
        seq = act.shape[layout.pos]
        if value.ndim == act.ndim and offset and value.shape[layout.pos] == offset + seq:
            value = value.narrow(layout.pos, offset, seq)  # KV cache: only the new positions
        if not _lines_up(value, act, self.broadcast):
            rule = "the batch must be 1 or {}, the other axes must match".format(act.shape[0])
            if self.broadcast:
                rule += " or be 1"
            cached = f" (this forward pass follows {offset} cached tokens)" if offset else ""
            raise ValueError(
                f"{self.what} for {name!r} has shape {tuple(value.shape)}, which does not line "
                f"up with the activation's shape {tuple(act.shape)}{cached}: {rule}"
            )
        return value.to(act.device, act.dtype)


def _lines_up(value: Tensor, act: Tensor, broadcast: bool) -> bool:
    if value.ndim != act.ndim or value.shape[0] not in (1, act.shape[0]):
        return False
    allowed = (lambda v, a: v in (1, a)) if broadcast else (lambda v, a: v == a)
    return all(allowed(v, a) for v, a in zip(value.shape[1:], act.shape[1:]))


def _source_tensor(source: Source, name: str) -> Tensor:
    if isinstance(source, ActivationCache):
        tensor = source.cache_dict.get(name)
        if tensor is not None and not source.has_batch_dim:
            tensor = tensor[None]
    elif isinstance(source, Mapping):
        tensor = source.get(name)
    else:
        raise TypeError(
            f"source must be an ActivationCache or a dict of tensors, got {type(source).__name__}"
        )
    if tensor is None:
        held = list(source.keys())
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise ValueError(
            f"the source has no activation for {name!r} (it holds {shown or 'nothing'})"
        )
    return tensor


def patch(
    model: HookedRootModule | None,
    source: Source,
    hooks: str | Sequence[str],
    layers: Layers = "all",
    positions: Positions = None,
    heads: Indices = None,
    neurons: Indices = None,
    from_position: FromPosition = None,
) -> Patch:
    """Activation patching: replace activations with those of another run.

    The standard causal intervention: run the model on a target input while chosen
    activations (hook point x positions x heads x neurons) are taken from a source run, usually
    `_, source = model.run_with_cache(clean_tokens)`. Everything else is left as computed in
    the target run, so downstream components see the patched values.

    Shapes must line up: the source activation at each hook point has the target's shape,
    except that a batch of 1 is broadcast to the target batch (one source prompt patched into
    many target prompts). Positions are the same indices in both runs; patch between prompts of
    the same length (or slice the source yourself and pass a dict).

    Args:
        model: the model, or None with full hook names in `hooks`.
        source: an `ActivationCache` or a dict `{hook_name: tensor}`.
        hooks: hook families or names (`"resid_pre"`, `"z"`, `"mlp_post"`, full names, ...).
        layers: `"all"` (default), an int or a list of ints; None with full hook names.
        positions: None (all), an int, a list of ints, a slice (query positions for patterns).
        heads: head indices, for hook points with a head axis (`z`, `q`, `k`, `v`, `result`,
            `pattern`, ...: `[batch, pos, head, d_head]` or `[batch, head, q, k]`).
        neurons: last-axis indices of `[batch, pos, d]` hook points (`mlp_post` neurons).
        from_position: patch this position and every later one instead of `positions`.

    Returns:
        A `Patch` hook.

    Raises:
        ValueError: the source lacks a hook point; shapes do not line up (the message names the
            hook and both shapes, raised during the forward pass); heads/neurons asked of a hook
            point without that axis; an index out of range.
    """
    names = hook_names(model, hooks, layers)
    selection = Selection(positions, heads, neurons, from_position)
    values = {name: _source_tensor(source, name) for name in names}
    return Patch(names, values, selection, model)


def zero_ablate(
    model: HookedRootModule | None,
    hooks: str | Sequence[str],
    layers: Layers = "all",
    positions: Positions = None,
    heads: Indices = None,
    neurons: Indices = None,
    from_position: FromPosition = None,
) -> Patch:
    """Zero ablation: set the selected activations to 0.

    The bluntest ablation: it removes the component's contribution but also pushes downstream
    activations off-distribution (zero is rarely a typical value), so effects can be
    overestimated; prefer `mean_ablate` or `resample_ablate` for circuit claims.

    Args: as `patch`, without a source.

    Returns:
        A `Patch` hook whose values are 0.
    """
    names = hook_names(model, hooks, layers)
    selection = Selection(positions, heads, neurons, from_position)
    return Patch(names, dict.fromkeys(names, 0.0), selection, model, broadcast=True, what="zeros")


def mean_ablate(
    model: HookedRootModule | None,
    source: Source,
    hooks: str | Sequence[str],
    layers: Layers = "all",
    over: Literal["batch", "batch_pos"] | None = "batch",
    positions: Positions = None,
    heads: Indices = None,
    neurons: Indices = None,
    from_position: FromPosition = None,
) -> Patch:
    """Mean ablation: set the selected activations to their mean over a reference distribution.

    Replaces a component's output by its average, which removes the information it carries
    about this particular input while keeping downstream activations near their usual range.

    The means are computed (in float32) from `source` when the hook is built:
    - `over="batch"`: mean over the batch, one value per position, `[1, pos, ...]`; targets
      must have the source's sequence length. Natural with templated prompts (IOI) where a
      position means the same thing in every prompt.
    - `over="batch_pos"`: mean over the batch and the positions, `[1, 1, ...]`; fits any
      sequence length. For patterns `[batch, head, q, k]` the mean is over batch and query
      positions, `[1, head, 1, k]`.
    - `over=None`: `source` already holds the means (any shape that broadcasts, e.g.
      `[1, 1, d]` or `[1, pos, d]`; add leading axes to a `[d]` vector yourself).
    Padding tokens in `source` are averaged in like any others; pass precomputed means to
    exclude them.

    Args:
        model: the model, or None with full hook names.
        source: an `ActivationCache` or dict of activations (or of means when `over=None`).
        hooks, layers, positions, heads, neurons, from_position: as `patch`.
        over: what to average over, see above.

    Returns:
        A `Patch` hook whose values are the means.
    """
    names = hook_names(model, hooks, layers)
    selection = Selection(positions, heads, neurons, from_position)
    means = {}
    for name in names:
        tensor = _source_tensor(source, name)
        if over is None:
            means[name] = tensor
            continue
        tensor = tensor.detach().to(_compute_dtype(tensor.dtype))
        if over == "batch":
            means[name] = einops.reduce(tensor, "batch ... -> 1 ...", "mean")
        elif over == "batch_pos":
            pattern = {
                _BPD: "b p d -> 1 1 d",
                _BPHD: "b p h d -> 1 1 h d",
                _BHQK: "b h q k -> 1 h 1 k",
                _BP: "b p -> 1 1",
            }[_layout(name, tensor.ndim)]
            means[name] = einops.reduce(tensor, pattern, "mean")
        else:
            raise ValueError(f"over must be 'batch', 'batch_pos' or None, got {over!r}")
    return Patch(names, means, selection, model, broadcast=True, what="mean")


def resample_rows(batch: int, seed: int = 0, avoid_self: bool = True) -> Int[Tensor, " batch"]:
    """The source row that each target row takes in `resample_ablate`.

    `perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))`. Without
    `avoid_self` the rows are `perm` itself (a uniform random permutation, which may map a row
    to itself). With `avoid_self`, row `perm[j]` takes source row `perm[(j + 1) % batch]`: the
    permutation is one cycle through all rows, so no row keeps its own activation (this
    matters when source and target are the same batch).

    Args:
        batch: number of rows in the source (and target) batch.
        seed: seed of the CPU generator.
        avoid_self: never map a row to itself (needs batch >= 2).

    Returns:
        `rows` with `rows[i]` the source row used for target row `i`.
    """
    if avoid_self and batch < 2:
        raise ValueError(
            f"resample ablation with avoid_self=True needs at least 2 source rows, got {batch}"
        )
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    if not avoid_self:
        return perm
    rows = torch.empty_like(perm)
    rows[perm] = perm.roll(-1)
    return rows


def resample_ablate(
    model: HookedRootModule | None,
    source: Source,
    hooks: str | Sequence[str],
    layers: Layers = "all",
    seed: int = 0,
    avoid_self: bool = True,
    positions: Positions = None,
    heads: Indices = None,
    neurons: Indices = None,
    from_position: FromPosition = None,
) -> Patch:
    """Resample ablation: replace activations with those of *other* inputs.

    Target row `i` takes the activation of source row `rows[i]`, `rows =
    resample_rows(batch, seed, avoid_self)` (stored as `.source_rows`); the same row mapping is
    used at every hook point, so a resampled circuit sees one consistent other input. Unlike
    mean ablation this keeps activations on-distribution (causal scrubbing, Chan et al. 2022).
    Typically the source is a cache of the same batch (`run_with_cache(tokens)`), or of a
    reference batch of the same size and sequence length. Averaging the metric over several
    seeds estimates the expectation over resamples.

    Args:
        model: the model, or None with full hook names.
        source: an `ActivationCache` or dict of activations, batch equal to the target batch.
        hooks, layers, positions, heads, neurons, from_position: as `patch`.
        seed: seed of the permutation.
        avoid_self: never give a row its own activation (see `resample_rows`).

    Returns:
        A `Patch` hook with `source_rows` set.
    """
    names = hook_names(model, hooks, layers)
    selection = Selection(positions, heads, neurons, from_position)
    tensors = {name: _source_tensor(source, name) for name in names}
    batches = {t.shape[0] for t in tensors.values()}
    if len(batches) != 1:
        raise ValueError(f"source activations have different batch sizes: {sorted(batches)}")
    rows = resample_rows(batches.pop(), seed, avoid_self)
    values = {name: t[rows.to(t.device)] for name, t in tensors.items()}
    hook = Patch(names, values, selection, model, what="resample source")
    hook.source_rows = rows
    return hook


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


class Capture(Hook):
    """Record activations into a dict; read them like a dict, also after the `with` block.

    `capture[name]` is the last activation seen at `name` (or the list of all of them with
    `append=True`). Entering the context clears what an earlier use recorded. The hook never
    changes the activation. With `keep_grad=True` (and no `device`) the stored tensor *is* the
    activation the model passes on: not detached, not copied, so `torch.autograd.grad(value,
    [capture[n] for n in names])` gives the gradient at each hook point (see `capture`).
    """

    def __init__(
        self,
        hook_names: Sequence[str],
        model: HookedRootModule | None = None,
        keep_grad: bool = False,
        device: str | torch.device | None = None,
        append: bool = False,
    ) -> None:
        super().__init__(hook_names, model)
        self.keep_grad = keep_grad
        self.device = device
        self.append = append
        self.store: dict[str, Tensor | list[Tensor]] = {}

    def __call__(self, activation: Tensor, hook: HookPoint) -> None:
        tensor = activation if self.keep_grad else activation.detach()
        if self.device is not None:
            tensor = tensor.to(self.device)
        if self.append:
            self.store.setdefault(hook.name, []).append(tensor)  # type: ignore[union-attr]
        else:
            self.store[hook.name] = tensor
        return None

    def attach(self, model: HookedRootModule | None = None) -> Capture:
        self.store.clear()
        super().attach(model)
        return self

    def __getitem__(self, name: str) -> Tensor | list[Tensor]:
        if name not in self.store:
            if name not in self.hook_names:
                raise KeyError(f"{name!r} is not captured; this capture holds {self.hook_names}")
            raise KeyError(f"nothing captured at {name!r} yet: no forward pass reached it")
        return self.store[name]

    def __contains__(self, name: object) -> bool:
        return name in self.store

    def __iter__(self) -> Iterator[str]:
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)

    def keys(self):
        return self.store.keys()

    def values(self):
        return self.store.values()

    def items(self):
        return self.store.items()


def capture(
    model: HookedRootModule | None,
    hooks: str | Sequence[str],
    layers: Layers = "all",
    keep_grad: bool = False,
    device: str | torch.device | None = None,
    append: bool = False,
) -> Capture:
    """Record activations at hook points, readable after the context exits.

    Placed after other hooks on the same hook point (entered last), it records the activation
    the model actually passes on. Tensors are detached unless `keep_grad` (then gradients flow
    through them to, for example, a steering vector); they are not copied, as in
    `run_with_cache`.

    **Capture with gradient.** `capture(model, names, keep_grad=True)` is the one way the
    gradient methods (AtP, AtP*, IG, RelP, EAP) keep activations in the autograd graph: every
    stored tensor is the very activation object downstream layers consume, so after
    `value = metric(model(tokens))` inside the context, `torch.autograd.grad(value,
    [store[n] for n in names])` is d value / d activation at each hook point (None for a hook
    point the value does not depend on). Gradients are taken with respect to what the hook
    point passes on, i.e. *after* hooks attached before the capture (an interpolation or a
    patch entered first) and *before* hooks attached after it (enter a gradient gate after the
    capture to have it act on the captured tensor's gradient). With `append=True` each forward
    pass through a hook point adds one graph node to a list (several forward passes under one
    backward). Combine it with `model.hooks(fwd_hooks=...)` by nesting the contexts in the
    order the hooks should run, or use the plain `fwd_hooks()` list.

    Args:
        model: the model, or None with full hook names.
        hooks: hook families or names.
        layers: `"all"` (default), an int or a list of ints; None with full hook names.
        keep_grad: keep the autograd graph instead of detaching.
        device: move each tensor there (e.g. "cpu" to save accelerator memory).
        append: keep every call's activation in a list instead of the last one; during
            generation with a KV cache, `torch.cat(store[name], dim=1)` is the whole sequence.

    Returns:
        A `Capture` hook, which is also a read-only mapping `{hook_name: activation}`.

    Example:
        >>> with capture(model, ["blocks.0.hook_resid_post"]) as store:
        ...     model(tokens)
        >>> store["blocks.0.hook_resid_post"].shape
        torch.Size([3, 12, 64])
    """
    names = hook_names(model, hooks, layers)
    return Capture(names, model, keep_grad=keep_grad, device=device, append=append)
