"""Splice SAEs into a `HookedTransformer`, with an error term that keeps the model's output.

`attach(model, saes)` works on the very model object `interp.models.load` returns (no copy, no
conversion to SAELens's `HookedSAETransformer`). At each SAE's hook point, say
`blocks.15.hook_resid_pre`, the activation `x` is replaced by

    x_hat + error,   x_hat = decode(encode(x)),   error = x - decode(encode(x)) (computed apart)

and the SAE's own hook points become hook points of the model, named as in SAELens's
`HookedSAETransformer`::

    blocks.15.hook_resid_pre.hook_sae_input      x (what the SAE reads)
    blocks.15.hook_resid_pre.hook_sae_acts_pre   encoder pre-activations   [batch pos d_sae]
    blocks.15.hook_resid_pre.hook_sae_acts_post  latents                   [batch pos d_sae]
    blocks.15.hook_resid_pre.hook_sae_recons     x_hat
    blocks.15.hook_resid_pre.hook_sae_error      error = x - x_hat
    blocks.15.hook_resid_pre.hook_sae_output     x_hat + error, what flows on

so `run_with_cache`, `run_with_hooks`, `model.hooks(...)`, `interp.hooks` and backward hooks all
reach the latents; `latent_hook_name(hook)` builds the name. The original hook point
(`blocks.15.hook_resid_pre`) stays where it was and sees the spliced value (the same as
`hook_sae_output`), so hooks already on it, and hook names used elsewhere, keep working.

**Error term and gradients.** With `use_error_term=True` (the default) the forward value is the
model's own up to float rounding (~1e-6 relative). The error node is computed from a second,
hook-free pass through the SAE, so an edit of the latents (zeroing one, patching from another
run) changes the output by exactly the decoded change, and an edit of `hook_sae_error` (e.g.
zeroing it) shows what the reconstruction alone does. Both passes stay in the autograd graph:

- the gradient at the latents is `grad_output @ W_dec.T` (the error does not cancel it);
- the gradient at `hook_sae_error` is `grad_output`;
- the gradient that flows upstream of the hook is exactly `grad_output`: the model's true
  gradient, as in Marks et al.'s sparse feature circuits (SAELens's own error term is computed
  under `no_grad`, so its upstream gradient is the SAE's Jacobian instead and its error node
  has no gradient).

With `use_error_term=False` the SAE's reconstruction replaces the activation outright (the
"spliced-in" model used for cross-entropy-recovered numbers) and gradients flow through the SAE.

**Skipped positions.** An SAE trained without the first position(s) of each context (interp's
SmolLM2 SAEs skip position 0, an attention sink whose norm is ~100x the others) is not applied
there: the activation passes through at positions before `skip_first` (default from the SAE's
metadata), so even without the error term the spliced model is unchanged at those positions.

When nothing observes or edits any of an error-term SAE's hook points (no forward or backward
hooks on them), the splice passes the activation through untouched without running the SAE: the
output is then bit-identical to the plain model and attaching costs nothing.

**Checks at attach time.** The hook must exist in the model (close names are suggested); the
SAE's width `d_in` must match the activation there (known from the model config for resid,
attention/MLP outputs, MLP neurons, `hook_z`; otherwise checked at the first forward pass); its
dtype and device must match the model's; its metadata hook name, if any, must match the hook it
is attached to; one SAE per hook. Transcoders and single-head SAEs are not supported.

Use::

    with attach(model, {"blocks.15.hook_resid_pre": sae}) as att:
        logits, cache = model.run_with_cache(tokens, names_filter=att.hook_names())
    # or: att = attach(model, [sae1, sae2]); ...; att.detach()   (detach(model) removes all)
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from interp.hooks import hook_family
from interp.saes.quality import sae_skip_first

__all__ = [
    "SAE_HOOK_POINTS",
    "Attachment",
    "SAESplice",
    "attach",
    "attached_saes",
    "detach",
    "latent_hook_name",
]

#: The SAE hook points that become model hook points, as `<hook_name>.<point>`.
SAE_HOOK_POINTS = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)

_REGISTRY_ATTR = "_interp_sae_splices"

#: Hook points whose activation width the model config tells: by `interp.hooks` family, and
#: the few outside the families (embeddings, norm outputs) whose width is d_model.
_D_MODEL_FAMILIES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_D_MLP_FAMILIES = ("mlp_pre", "mlp_post", "mlp_pre_linear")
_PER_HEAD_FAMILIES = ("z", "q", "result")  # n_heads heads (k and v have fewer under GQA)
_D_MODEL_OTHERS = ("hook_embed", "hook_pos_embed", "hook_normalized")


def latent_hook_name(hook_name: str, point: str = "acts_post") -> str:
    """`<hook_name>.hook_sae_<point>`, e.g. `blocks.3.hook_resid_pre.hook_sae_acts_post`.

    `point` is one of input, acts_pre, acts_post, recons, error, output.
    """
    full = point if point.startswith("hook_sae_") else f"hook_sae_{point}"
    if full not in SAE_HOOK_POINTS:
        raise ValueError(f"Unknown SAE hook point {point!r}; use one of "
                         f"{', '.join(p.removeprefix('hook_sae_') for p in SAE_HOOK_POINTS)}.")
    return f"{hook_name}.{full}"


class SAESplice:
    """One SAE spliced into one hook point of a model (made by `attach`, removed by `remove`).

    Attributes:
        hook_name: the model hook point, e.g. `blocks.15.hook_resid_pre`.
        sae: the SAELens SAE (not registered as a submodule: the model's `state_dict`, `.to()`
            and parameters are unchanged).
        use_error_term: see the module docstring; may be changed while attached.
        skip_first: leading positions where the activation passes through untouched.
    """

    def __init__(self, model: HookedTransformer, hook_name: str, sae: SAE, use_error_term: bool,
                 skip_first: int = 0):
        self.model = model
        self.hook_name = hook_name
        self.sae = sae
        self.use_error_term = bool(use_error_term)
        self.skip_first = int(skip_first)
        self.hook_point: HookPoint = model.hook_dict[hook_name]
        self._points: dict[str, HookPoint] = {name: getattr(sae, name) for name in SAE_HOOK_POINTS}
        for name, point in self._points.items():
            self.hook_point.add_module(name, point)
        self._handle = self.hook_point.register_forward_pre_hook(self._pre_hook)

    # -- the spliced forward -----------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Tensor]:
        return (self.forward(args[0]),)

    def forward(self, x: Float[Tensor, "batch pos *d_act"]) -> Float[Tensor, "batch pos *d_act"]:
        """What flows on from the hook point (see the module docstring)."""
        self._check_width(x)
        sae = self.sae
        if not self.use_error_term:
            return sae.hook_sae_output(self._keep_skipped(x, sae.decode(sae.encode(x))))
        if not self._observed():
            return x
        x_hat = sae.decode(sae.encode(x))
        with _hooks_disabled(sae):  # the error is what the untouched SAE misses
            x_hat_clean = sae.decode(sae.encode(x))
        error = sae.hook_sae_error(x - x_hat_clean)
        return sae.hook_sae_output(self._keep_skipped(x, x_hat + error))

    def _keep_skipped(self, x: Tensor, out: Tensor) -> Tensor:
        """`out`, with the activation itself at the first `skip_first` positions."""
        if self.skip_first <= 0:
            return out
        return torch.cat([x[:, : self.skip_first], out[:, self.skip_first:]], dim=1)

    def _observed(self) -> bool:
        return any(p._forward_hooks or p._forward_pre_hooks or p._backward_hooks
                   or p._backward_pre_hooks for p in self._points.values())

    def _check_width(self, x: Tensor) -> None:
        width = _flat_width(x.shape, self.sae)
        if width != self.sae.cfg.d_in:
            raise ValueError(
                f"The SAE at {self.hook_name} has d_in={self.sae.cfg.d_in}, but the activation "
                f"there has shape {tuple(x.shape)} (width {width}). Attach it to a hook whose "
                "activation has that width (an SAE trained on this model at that hook)."
            )

    def remove(self) -> None:
        """Undo the splice: drop the pre-hook and the SAE hook points from the model."""
        self._handle.remove()
        for name in self._points:
            if name in self.hook_point._modules:
                del self.hook_point._modules[name]
        self.sae.setup()  # give the SAE's hook points back their own names


class Attachment:
    """The SAEs one `attach` call spliced in; a context manager that detaches them on exit.

    Attributes:
        model: the model they are attached to.
        splices: hook name -> `SAESplice`.
    """

    def __init__(self, model: HookedTransformer, splices: dict[str, SAESplice]):
        self.model = model
        self.splices = splices

    @property
    def saes(self) -> dict[str, SAE]:
        """Hook name -> SAE."""
        return {h: s.sae for h, s in self.splices.items()}

    @property
    def attached(self) -> bool:
        registry = _registry(self.model)
        return any(registry.get(h) is s for h, s in self.splices.items())

    def hook_names(self, point: str = "acts_post") -> list[str]:
        """The model hook names of one SAE hook point for every attached SAE, e.g. the latents
        `blocks.3.hook_resid_pre.hook_sae_acts_post` (use as `names_filter` or as sites)."""
        return [latent_hook_name(h, point) for h in self.splices]

    def detach(self) -> None:
        """Remove these SAEs (idempotent); other attachments stay."""
        registry = _registry(self.model)
        for hook_name, splice in self.splices.items():
            if registry.get(hook_name) is splice:
                splice.remove()
                del registry[hook_name]
        self.model.setup()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Attachment({state}: {', '.join(self.splices)})"


def attach(
    model: HookedTransformer,
    saes: SAE | Sequence[SAE] | Mapping[str, SAE],
    use_error_term: bool = True,
    *,
    skip_first: int | None = None,
    check_metadata: bool = True,
) -> Attachment:
    """Splice one or more SAEs into `model` (in place); see the module docstring.

    Args:
        model: a `HookedTransformer` (e.g. from `interp.models.load`).
        saes: `{hook_name: sae}`, or SAEs whose `cfg.metadata.hook_name` says where they go.
        use_error_term: keep the model's output by adding each SAE's error (True), or replace
            activations by the reconstructions (False).
        skip_first: leading positions of every forward pass where the activation passes
            through untouched (the SAE still runs there and its hook points show it, but its
            latents have no effect and get zero gradient). Default: each SAE's own
            (`cfg.metadata.seqpos_slice` start, 1 for interp's SmolLM2 SAEs, which never saw
            the attention-sink position 0; else 0). Positions count within one forward pass:
            when generating with a KV cache, each new token's pass starts at 0, so use
            `skip_first=0` (or no KV cache) there.
        check_metadata: refuse an SAE whose metadata names a different hook than the one it is
            attached to (set False to move an SAE on purpose).

    Returns:
        An `Attachment`: use it as a context manager, or call `.detach()`.

    Raises:
        ValueError: unknown hook, wrong width, dtype or device mismatch, a hook that already has
            an SAE, an SAE without a hook name, a transcoder or a single-head SAE.
    """
    pairs = _as_pairs(saes)
    registry = _registry(model)
    seen: set[str] = set()
    for hook_name, sae in pairs:
        _validate(model, hook_name, sae, check_metadata)
        if hook_name in registry or hook_name in seen:
            raise ValueError(
                f"{hook_name} already has an SAE attached. Detach it first "
                "(Attachment.detach() or interp.saes.detach(model, [hook_name]))."
            )
        seen.add(hook_name)
    splices = {
        h: SAESplice(model, h, sae, use_error_term,
                     sae_skip_first(sae) if skip_first is None else skip_first)
        for h, sae in pairs
    }
    registry.update(splices)
    model.setup()
    return Attachment(model, splices)


def detach(model: HookedTransformer, hook_names: Sequence[str] | None = None) -> None:
    """Remove the SAEs at `hook_names` (default: all SAEs attached to `model`)."""
    registry = _registry(model)
    names = list(registry) if hook_names is None else list(hook_names)
    for name in names:
        if name not in registry:
            raise ValueError(f"No SAE is attached at {name!r}; attached: {', '.join(registry) or 'none'}.")
        registry.pop(name).remove()
    model.setup()


def attached_saes(model: HookedTransformer) -> dict[str, SAE]:
    """Hook name -> SAE, for every SAE attached to `model`."""
    return {h: s.sae for h, s in _registry(model).items()}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _registry(model: HookedTransformer) -> dict[str, SAESplice]:
    registry = model.__dict__.get(_REGISTRY_ATTR)
    if registry is None:
        registry = {}
        model.__dict__[_REGISTRY_ATTR] = registry
    return registry


def _as_pairs(saes: SAE | Sequence[SAE] | Mapping[str, SAE]) -> list[tuple[str, SAE]]:
    if isinstance(saes, SAE):
        saes = [saes]
    if isinstance(saes, Mapping):
        pairs = list(saes.items())
    else:
        pairs = []
        for sae in saes:
            if not isinstance(sae, SAE):
                raise TypeError(f"Expected SAELens SAEs, got {type(sae).__name__}.")
            hook = sae.cfg.metadata.hook_name
            if not hook:
                raise ValueError(
                    "An SAE has no hook name in its metadata (cfg.metadata.hook_name), so attach "
                    "cannot tell where it goes: pass {hook_name: sae} instead."
                )
            pairs.append((hook, sae))
    for hook, sae in pairs:
        if not isinstance(sae, SAE):
            raise TypeError(f"Expected a SAELens SAE for {hook!r}, got {type(sae).__name__}.")
    return pairs


def _validate(model: HookedTransformer, hook_name: str, sae: SAE, check_metadata: bool) -> None:
    if hook_name not in model.hook_dict:
        sae_points = [h for h in model.hook_dict if ".hook_sae_" not in h]
        close = difflib.get_close_matches(hook_name, sae_points, n=3, cutoff=0.6)
        raise ValueError(
            f"{model.cfg.model_name} has no hook point {hook_name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (model.hook_dict lists them; e.g. blocks.0.hook_resid_pre, blocks.0.hook_mlp_out)."
        )
    if ".hook_sae_" in hook_name:
        raise ValueError(f"{hook_name} is an SAE hook point; attach SAEs to model activations.")
    meta = sae.cfg.metadata
    if meta.hook_name_out and meta.hook_name_out != meta.hook_name:
        raise ValueError(f"The SAE for {hook_name} is a transcoder ({meta.hook_name} -> "
                         f"{meta.hook_name_out}); attach supports SAEs only.")
    if meta.hook_head_index is not None:
        raise ValueError(f"The SAE for {hook_name} reads one head (hook_head_index="
                         f"{meta.hook_head_index}); attach supports whole-activation SAEs only.")
    if check_metadata and meta.hook_name and meta.hook_name != hook_name:
        raise ValueError(
            f"The SAE was trained at {meta.hook_name} (cfg.metadata.hook_name) but is being "
            f"attached at {hook_name}. Attach it at its own hook, or pass check_metadata=False "
            "to move it on purpose."
        )
    trained = meta.interp or {}
    processed = str(model.cfg.normalization_type or "").endswith("Pre")
    if "processing" in trained and bool(trained["processing"]) != processed:
        warnings.warn(
            f"The SAE for {hook_name} was trained on a model loaded with processing="
            f"{trained['processing']}, this one has processing={processed}; on LayerNorm models "
            "the residual stream differs between the two (it is mean-centred when processed).",
            stacklevel=3,
        )
    expected = _expected_width(model, hook_name, sae)
    if expected is not None and expected != sae.cfg.d_in:
        raise ValueError(
            f"Width mismatch at {hook_name}: the SAE has d_in={sae.cfg.d_in} but the activation "
            f"there has width {expected} in {model.cfg.model_name} (d_model={model.cfg.d_model}, "
            f"d_mlp={model.cfg.d_mlp}). Was this SAE trained on another model or hook?"
        )
    model_dtype = model.cfg.dtype
    if sae.dtype != model_dtype:
        raise ValueError(
            f"dtype mismatch at {hook_name}: the SAE is {sae.dtype} but the model runs in "
            f"{model_dtype}. Cast one of them, e.g. sae.to({model_dtype})."
        )
    model_device = model.W_E.device
    sae_device = sae.W_dec.device
    if sae_device.type != model_device.type or (
        sae_device.index is not None and model_device.index is not None
        and sae_device.index != model_device.index
    ):
        raise ValueError(
            f"device mismatch at {hook_name}: the SAE is on {sae_device}, the model on "
            f"{model_device}. Move the SAE: sae.to('{model_device}')."
        )


def _expected_width(model: HookedTransformer, hook_name: str, sae: SAE) -> int | None:
    """The activation width at `hook_name` from the model config, or None when not known."""
    cfg = model.cfg
    family = hook_family(hook_name)
    if family in _D_MODEL_FAMILIES or (family is None and hook_name.endswith(_D_MODEL_OTHERS)):
        return cfg.d_model
    if family in _D_MLP_FAMILIES:
        return cfg.d_mlp
    if family in _PER_HEAD_FAMILIES:
        return cfg.n_heads * cfg.d_head if sae.cfg.reshape_activations == "hook_z" else cfg.d_head
    return None


def _flat_width(shape: torch.Size, sae: SAE) -> int:
    if sae.cfg.reshape_activations == "hook_z" and len(shape) >= 2:
        return shape[-2] * shape[-1]
    return shape[-1]


_IDENTITY = nn.Identity()


@contextmanager
def _hooks_disabled(sae: SAE) -> Iterator[None]:
    """Run the SAE with its hook points replaced by identities (the model keeps the real ones)."""
    names = [n for n in SAE_HOOK_POINTS if isinstance(getattr(sae, n, None), HookPoint)]
    saved = {n: getattr(sae, n) for n in names}
    try:
        for n in names:
            setattr(sae, n, _IDENTITY)
        yield
    finally:
        for n, point in saved.items():
            setattr(sae, n, point)
