"""LRP propagation rules as a forward-time switch: `with lrp_rules(model): ...`.

Relevance patching (RelP, Jafari et al. 2025, arXiv 2508.21258) is attribution patching whose
backward pass follows Layer-wise Relevance Propagation (LRP) rules instead of the plain chain
rule. In the Gradient x Input view of LRP each rule is a *modified local gradient*: the forward
computation stays exactly as it is and only the backward pass changes, so

    with lrp_rules(model):                 # LRPRules.relp(): LN, identity and half rules
        logits = model(tokens)             # bit-identical to model(tokens)
        metric(logits).backward()          # gradients are now relevance gradients

and `activation * gradient` at any hook point is that activation's relevance. RelP is AtP run
inside this context (`interp.attribution.atp`).

**The rules** (each a field of `LRPRules`):

- *LN rule* (Ali et al. 2022): LayerNorm / RMSNorm divide by a scale (the std or RMS of their
  input) that the backward pass treats as a constant. A norm becomes the linear map
  `x -> (x - mean(x)) / c * w` (LayerNorm) or `x -> x / c * w` (RMSNorm).
- *Identity rule* (Jafari et al. 2024; AttnLRP eq. 9): an element-wise activation `y = act(x)`
  passes relevance through unchanged (`x * dy/dx = y`), i.e. `dy/dx := act(x) / x`.
- *Half rule* (Arras et al. 2019; AttnLRP's uniform rule): a gated product `y = a * b` gives each
  factor half the relevance: `dy/da := b / 2`, `dy/db := a / 2`.
- *Attention pattern* (`attn_pattern`): `"none"` keeps the plain gradient through
  softmax(QK^T) (RelP's default); `"detach"` is the AH rule of CP-LRP (Ali et al. 2022): the
  pattern is a constant for everything upstream, so no relevance reaches queries and keys and
  attention is linear in the values; `"uniform"` is AttnLRP (Achtibat et al. 2024): the
  uniform rule on both bilinear products (`pattern @ v` and `q @ k^T`) and plain Gradient x
  Input through the softmax, which is AttnLRP's softmax rule (their Prop. 3.1,
  `R_in = x * (R_out - s * sum(R_out))`, is exactly `x * softmax'(x)^T g` with `R_out = s * g`).

**Where each rule sits** (TransformerLens names; every rule is checked at run time):

| rule | placed at | what the hook returns |
|---|---|---|
| LN | `<norm>.hook_scale` of every LayerNorm, LayerNormPre, RMSNorm, RMSNormPre (`ln1`, `ln2`, `ln_final`, Gemma's `ln1_post`/`ln2_post` and `attn.q_norm`/`attn.k_norm`, SoLU's `mlp.ln`) | the scale, detached |
| identity | the activation function of each MLP (`mlp.act_fn`, between `mlp.hook_pre` and `mlp.hook_post`, or the gate branch of a gated MLP) | `act(x)` with gradient `act(x)/x` |
| half | `mlp.hook_post` of gated MLPs (`act(gate) * linear + b_in`) | the value, gradient halved |
| detach | `attn.hook_pattern` | the pattern, zero gradient upstream |
| uniform | `attn.hook_z` (output of `pattern @ v`) and `attn.hook_pattern` (upstream of `q @ k^T`) | the value, gradient halved at each |

The hook-point rules are added with `prepend=True`, so they run before every other hook at
their hook point: a capture, patch or steering hook there sees the activation the rule
produced, and the gradient a capture reads there is the relevance gradient of that activation
(at `hook_z` the full one; the halving applies to what flows further up, to the pattern and
the values). Under `"uniform"` the values get 1/2 and queries and keys 1/4 of the plain
gradient, as in lxt's AttnLRP (`lxt/efficient/patches.py`, `wrap_attention_forward`); the
second halving is placed at `hook_pattern` rather than after `q @ k^T` (the softmax backward is
linear in its incoming gradient, so everything upstream is the same), which means a gradient
read at `attn.hook_attn_scores` is already the half that goes to each of `q` and `k`.

**Why the identity rule is not a hook.** The rule needs the tensor the activation function
receives. A forward hook at `mlp.hook_pre` does not see it whenever the hook point also has a
TransformerLens backward hook (as in the classic AtP recipe, `model.add_hook(name, fn, "bwd")`):
PyTorch wraps a module's output for its full backward hooks *after* all forward hooks ran, so
the activation function gets a different tensor object, and a rule built on the one the
forward hook saw would bypass the backward hook. So the context swaps each MLP's `act_fn` for a
wrapper (restored on exit; an `nn.Module` activation such as xIELU gets a PyTorch forward hook
instead). Activations that are not element-wise (SoLU, `x * softmax(x)`) get no identity rule.

**Rules are read at forward time.** Every hook and wrapper consults the `LRPRules` object when
the forward pass runs, not when the context is entered: set `ctx.rules.identity = False` and the
next forward pass uses plain gradients there. (The authors' TransformerLens fork chose the
activation function when the model was built, so setting `cfg.LRP_rules` after loading
silently skipped the identity rule; `tests/attribution/test_lrp.py` guards against that.)
Under `torch.no_grad()` nothing is changed at all.

**Exactly the same forward values.** A rule's output is `y.detach() - (s.detach() - s)` where `s`
is a surrogate whose gradient is the rule's: `s.detach() - s` is `+0.0` for finite `s` and
`y - 0.0` is `y` for every `y` (signed zeros included), so the forward pass is bit-identical as
long as activations are finite. Outputs are ordinary tensors, so later hooks may edit them in
place.

**Conservation.** With the LN, identity and half rules and `attn_pattern="detach"`, a model
without biases is, for the backward pass, a product of linear maps applied to its input, so
`sum(input * relevance_gradient)` equals the output (tested). `"none"` (relevance flows into
queries and keys as plain gradient) and `"uniform"` (the softmax rule absorbs relevance) do not
conserve; biases absorb relevance too.

**Not covered.** Soft-capping (`tanh` on attention scores or logits, Gemma 2), MoE routers
(plain gradient through the routing weights), and other element-wise non-linearities outside
MLPs keep their plain gradients. The half rule halves the gradient reaching `b_in` too (a
parameter; activation relevances are unaffected), where the RelP fork halves before adding it.
The CP-LRP treatment of gated MLPs (gate branch detached) is not offered.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedRootModule
from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre
from transformer_lens.components.abstract_attention import AbstractAttention
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.hook_points import HookPoint, LensHandle

__all__ = [
    "AttnPatternRule",
    "LRPContext",
    "LRPRules",
    "half_rule",
    "identity_rule",
    "ln_rule",
    "lrp_rules",
    "scale_grad",
]

AttnPatternRule = Literal["none", "detach", "uniform"]
_ATTN_PATTERN_RULES: tuple[str, ...] = ("none", "detach", "uniform")

#: Activation functions (`cfg.act_fn`) that are not element-wise and so get no identity rule.
_NOT_ELEMENTWISE = ("solu", "solu_ln")

_NORMS = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)


def _gated_classes() -> tuple[type, ...]:
    classes: list[type] = [GatedMLP]
    try:
        from transformer_lens.components.mlps.gated_mlp_4bit import GatedMLP4Bit

        classes.append(GatedMLP4Bit)
    except ImportError:  # pragma: no cover - depends on optional bitsandbytes
        pass
    try:
        from transformer_lens.components.mlps.moe import MoEGatedMLP

        classes.append(MoEGatedMLP)
    except ImportError:  # pragma: no cover
        pass
    return tuple(classes)


_GATED = _gated_classes()


# --------------------------------------------------------------------------------------------
# The rules as plain functions
# --------------------------------------------------------------------------------------------


def _with_gradient_of(y: Tensor, surrogate: Tensor) -> Tensor:
    """`y`'s exact values with `surrogate`'s gradient: `y.detach() - (s.detach() - s)`."""
    return y.detach() - (surrogate.detach() - surrogate)


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """`x` unchanged in the forward pass; the gradient flowing back through it times `factor`.

    Applied to the output of a product `a * b` (or `a @ b`) with `factor=0.5` it is the half
    (uniform) rule: each factor receives half of the plain gradient. With `factor=0.0` nothing
    flows upstream while the graph stays connected (upstream activations get zero gradients).
    `x` must be finite.
    """
    detached = x.detach()
    return detached - factor * (detached - x)


def ln_rule(
    x: Float[Tensor, "... d"], scale: Float[Tensor, "... 1"]
) -> Float[Tensor, "... d"]:
    """The LN rule: `x / scale` with `scale` treated as a constant in the backward pass.

    `x` is the (for LayerNorm: mean-centred) input, `scale` the std or RMS computed from it.
    The result is linear in `x` for the backward pass, so it passes relevance through
    unchanged: `sum(x * grad_x) == sum(out * grad_out)`. Inside a model the context applies
    the same rule by detaching each norm's `hook_scale`.
    """
    return x / scale.detach()


def identity_rule(x: Float[Tensor, "..."], y: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """The identity rule for an element-wise activation `y = act(x)`.

    Returns `y` (the same values) with gradient `d out / d x := y / x` (0 where `x == 0`, where
    the relevance `x * grad` is 0 anyway) and no gradient into `y`'s own graph. Relevance is
    passed through as if the activation were the identity: `x * grad_x == y * grad_y`. For
    GELU `y / x` is the Gaussian CDF, for SiLU the sigmoid.
    """
    xd, yd = x.detach(), y.detach()
    ratio = torch.where(xd == 0, torch.zeros_like(yd), yd / xd)
    return _with_gradient_of(y, x * ratio)


def half_rule(
    a: Float[Tensor, "..."], b: Float[Tensor, "..."], y: Float[Tensor, "..."] | None = None
) -> Float[Tensor, "..."]:
    """The half rule for a gated product `y = a * b`: each factor gets half the relevance.

    Returns `y` (default `a * b`) with gradients `d/da := b / 2` and `d/db := a / 2`, so that
    `a * grad_a + b * grad_b == y * grad_y`. Equivalent to `scale_grad(a * b, 0.5)`, which is
    how the context applies it at a gated MLP's `hook_post`.
    """
    if y is None:
        y = a * b
    surrogate = 0.5 * (a * b.detach() + a.detach() * b)
    return _with_gradient_of(y, surrogate)


# --------------------------------------------------------------------------------------------
# Which rules
# --------------------------------------------------------------------------------------------


@dataclass
class LRPRules:
    """Which LRP rules the backward pass follows. Read at every forward pass: change a field
    between passes and the next one uses the new setting."""

    ln: bool = True
    """LN rule: every LayerNorm/RMSNorm (pre, post, final, QK norms) divides by a scale that
    the backward pass treats as a constant."""

    identity: bool = True
    """Identity rule: each MLP's element-wise activation passes relevance through unchanged
    (local gradient `act(x) / x`)."""

    half: bool = True
    """Half rule: in gated MLPs, `act(gate) * linear` gives each factor half the relevance."""

    attn_pattern: AttnPatternRule = "none"
    """Attention: `"none"` plain gradient through softmax(QK^T) (RelP's default); `"detach"`
    the AH rule of CP-LRP (no relevance upstream of the pattern: attention is linear in the
    values); `"uniform"` AttnLRP (half of the relevance to the pattern and to the values, half
    of the pattern's again to each of queries and keys, plain Gradient x Input through the
    softmax)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError for an unknown `attn_pattern` (also checked at each forward)."""
        if self.attn_pattern not in _ATTN_PATTERN_RULES:
            raise ValueError(
                f"attn_pattern must be one of {_ATTN_PATTERN_RULES}, got {self.attn_pattern!r}"
            )

    @classmethod
    def relp(cls) -> LRPRules:
        """The RelP paper's set: LN, identity and half rules; plain gradient through attention
        patterns (`LRP_rules = ['LN-rule', 'Identity-rule', 'Half-rule']` in the authors'
        code)."""
        return cls(ln=True, identity=True, half=True, attn_pattern="none")

    @classmethod
    def cp(cls) -> LRPRules:
        """RelP's rules plus the AH rule (attention patterns detached, as in CP-LRP)."""
        return cls(ln=True, identity=True, half=True, attn_pattern="detach")

    @classmethod
    def attnlrp(cls) -> LRPRules:
        """AttnLRP: RelP's rules plus the uniform rule in attention (lxt's `attnLRP`)."""
        return cls(ln=True, identity=True, half=True, attn_pattern="uniform")

    @classmethod
    def off(cls) -> LRPRules:
        """No rule: the backward pass is the plain gradient (the hooks stay, doing nothing)."""
        return cls(ln=False, identity=False, half=False, attn_pattern="none")

    @property
    def any(self) -> bool:
        """Whether any rule is on."""
        return self.ln or self.identity or self.half or self.attn_pattern != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LRPRules:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LRP rule fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# The context
# --------------------------------------------------------------------------------------------

_Kind = Literal["ln", "half", "pattern", "z"]


class _RuleHook:
    """One TransformerLens hook function of an `LRPContext`; consults the rules when called."""

    def __init__(self, context: LRPContext, kind: _Kind) -> None:
        self.context = context
        self.kind = kind

    def __call__(self, act: Tensor, hook: HookPoint) -> Tensor | None:
        if not (torch.is_grad_enabled() and act.requires_grad):
            return None
        rules = self.context.rules
        if self.kind == "ln":
            return act.detach() if rules.ln else None
        if self.kind == "half":
            return scale_grad(act, 0.5) if rules.half else None
        rules.check()
        if self.kind == "pattern":
            if rules.attn_pattern == "detach":
                return scale_grad(act, 0.0)
            if rules.attn_pattern == "uniform":
                return scale_grad(act, 0.5)
            return None
        if self.kind == "z" and rules.attn_pattern == "uniform":
            return scale_grad(act, 0.5)
        return None

    def __repr__(self) -> str:  # TransformerLens calls repr() on every add_hook
        return f"LRPRuleHook({self.kind})"


class _IdentityActivation:
    """Stands in for an MLP's `act_fn`: the identity rule when it is on, else the original."""

    def __init__(self, context: LRPContext, inner: Callable[[Tensor], Tensor]) -> None:
        self.context = context
        self.inner = inner

    def __call__(self, x: Tensor) -> Tensor:
        if self.context.rules.identity and torch.is_grad_enabled() and x.requires_grad:
            with torch.no_grad():
                y = self.inner(x)
            return identity_rule(x, y)
        return self.inner(x)

    def __repr__(self) -> str:
        return f"LRPIdentityRule({getattr(self.inner, '__name__', self.inner)!r})"


# Models with an active LRPContext (entering a second one would apply some rules twice).
_ACTIVE: weakref.WeakSet = weakref.WeakSet()


class LRPContext:
    """LRP rules attached to one model; a context manager (see `lrp_rules`).

    Attributes:
        model: the model.
        rules: the `LRPRules` consulted at every forward pass (the very object passed in).
        hook_names: the TransformerLens hook points that carry a rule hook.
        activations: names of the MLP modules whose activation function carries the identity
            rule.
    """

    def __init__(self, model: HookedRootModule, rules: LRPRules) -> None:
        if not isinstance(rules, LRPRules):
            raise TypeError(f"rules must be an LRPRules, got {type(rules).__name__}")
        self.model = model
        self.rules = rules
        self._plan: list[tuple[str, _RuleHook]] = []
        self._mlps: list[tuple[str, torch.nn.Module]] = []
        self._plan_rules(model)
        self.hook_names = [name for name, _ in self._plan]
        self.activations = [name for name, _ in self._mlps]
        self._handles: list[tuple[HookPoint, LensHandle]] = []
        self._swapped: list[tuple[torch.nn.Module, Any]] = []
        self._module_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False

    def _plan_rules(self, model: HookedRootModule) -> None:
        hooks = {kind: _RuleHook(self, kind) for kind in ("ln", "half", "pattern", "z")}
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, _NORMS):
                self._plan.append((prefix + "hook_scale", hooks["ln"]))
            elif isinstance(module, AbstractAttention):
                self._plan.append((prefix + "hook_pattern", hooks["pattern"]))
                self._plan.append((prefix + "hook_z", hooks["z"]))
            elif hasattr(module, "act_fn") and isinstance(getattr(module, "hook_post", None),
                                                           HookPoint):
                cfg = module.cfg
                layer_norm_act = cfg.is_layer_norm_activation()
                if cfg.act_fn not in _NOT_ELEMENTWISE:
                    self._mlps.append((name, module))
                if isinstance(module, _GATED) and not layer_norm_act:
                    self._plan.append((prefix + "hook_post", hooks["half"]))
        hook_dict = model.hook_dict
        missing = [n for n, _ in self._plan if n not in hook_dict]
        if missing:  # a component class we mis-read; better to say so than to skip a rule
            raise RuntimeError(f"LRP rules expected hook points the model lacks: {missing}")

    # -- attach / detach -----------------------------------------------------------------

    def attach(self) -> LRPContext:
        """Add the rule hooks and activation wrappers. Prefer the `with` form.

        Raises:
            RuntimeError: already attached, or another `LRPContext` is active on the model.
        """
        if self.attached:
            raise RuntimeError("this LRPContext is already attached")
        if self.model in _ACTIVE:
            raise RuntimeError(
                "LRP rules are already active on this model; nesting would apply some rules "
                "twice. Change the active context's `rules` instead."
            )
        _ACTIVE.add(self.model)
        self._active = True
        try:
            for name, fn in self._plan:
                hook_point = self.model.hook_dict[name]
                # permanent: survives model.reset_hooks() inside the context; prepend: runs
                # before any other hook at this hook point.
                self.model.add_hook(name, fn, is_permanent=True, prepend=True)
                handle = next(h for h in hook_point.fwd_hooks if h.user_hook is fn)
                self._handles.append((hook_point, handle))
            for _, mlp in self._mlps:
                act = mlp.act_fn
                if isinstance(act, torch.nn.Module):
                    self._module_handles.append(act.register_forward_hook(self._module_act_hook))
                else:
                    self._swapped.append((mlp, act))
                    mlp.act_fn = _IdentityActivation(self, act)
        except BaseException:
            self.detach()
            raise
        return self

    def _module_act_hook(self, module: torch.nn.Module, args: tuple, output: Tensor):
        x = args[0]
        if self.rules.identity and torch.is_grad_enabled() and x.requires_grad:
            return identity_rule(x, output)
        return None

    def detach(self) -> None:
        """Remove exactly what `attach` added (a no-op when not attached)."""
        for hook_point, handle in self._handles:
            handle.hook.remove()
            for i, h in enumerate(hook_point.fwd_hooks):
                if h is handle:  # identity: a reset_hooks(including_permanent=True) may have
                    del hook_point.fwd_hooks[i]  # dropped it already
                    break
        for mlp, act in reversed(self._swapped):
            if isinstance(mlp.act_fn, _IdentityActivation) and mlp.act_fn.context is self:
                mlp.act_fn = act
        for module_handle in self._module_handles:
            module_handle.remove()
        if self._active:
            _ACTIVE.discard(self.model)
        self._handles, self._swapped, self._module_handles = [], [], []
        self._active = False

    @property
    def attached(self) -> bool:
        """Whether the rules are currently attached (between `attach` and `detach`)."""
        return self._active

    def __enter__(self) -> LRPContext:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (
            f"LRPContext({self.rules}, {len(self.hook_names)} hook points, "
            f"{len(self.activations)} activations, attached={self.attached})"
        )


def lrp_rules(
    model: HookedRootModule, rules: LRPRules | None = None, **overrides: Any
) -> LRPContext:
    """Make the backward pass follow LRP rules while leaving the forward pass bit-identical.

    Args:
        model: a `HookedTransformer` (LayerNorm or RMSNorm, plain or gated MLPs, MHA or GQA,
            processed or not).
        rules: the `LRPRules` to follow, default `LRPRules.relp()`. The context keeps this very
            object and reads it at every forward pass, so changing a field inside the `with`
            block takes effect at the next forward pass.
        **overrides: field values (`identity=False`, `attn_pattern="detach"`, ...) applied to a
            copy of `rules` (then mutate `ctx.rules`, not your original, to switch later).

    Returns:
        An `LRPContext`; entering it attaches the rules, leaving it removes exactly them (other
        hooks stay) and restores the activation functions.

    Example:
        >>> with lrp_rules(model, LRPRules.relp()) as ctx, hooks.capture(
        ...         model, "z", keep_grad=True) as z:
        ...     value = metric(model(tokens))
        ...     grads = torch.autograd.grad(value, list(z.values()))  # relevance gradients
        ...     ctx.rules.identity = False   # from the next forward pass on: plain activations
    """
    if rules is None:
        rules = LRPRules.relp()
    if overrides:
        rules = dataclasses.replace(rules, **overrides)
    return LRPContext(model, rules)
