"""Permanent weight edits that are recorded and undoable.

An edit changes a model's parameters in place and returns a `WeightEdit`: the original values
of exactly the entries it changed, a JSON-able `record` of what was done (to store with a
saved variant, `models.save_variant(..., metadata={"edits": [e.record]})`), and `restore()`,
which writes the originals back so the model is bit-for-bit what it was. Edits stack: restore
them in reverse order. A `WeightEdit` is also a context manager that restores on exit.
`interp.concepts.vectors.orthogonalise_weights` returns one too (a subclass that adds the
projected direction).

The edits here act on **MLP value vectors**: in TransformerLens a layer's MLP output is
`W_out^T h` with `W_out: [d_mlp, d_model]`, so row `d` of `blocks.{L}.mlp.W_out` is the vector
that neuron `d` writes into the residual stream, its *value vector* (Geva et al. 2022; the
"concept vectors" of ConceptVectors are such rows, columns of Hugging Face's
`down_proj.weight`). `add_noise` perturbs one with Gaussian noise, `set_value_vector`,
`scale_value_vector` and `zero_value_vector` replace it. Every other entry of every parameter
is left untouched (bit for bit), which `tests/test_edits.py` checks.

**Noise scales.** `add_noise(..., sigma, relative_to=...)` draws i.i.d. `N(0, s^2)` per
coordinate, with

- `relative_to=None`: `s = sigma`, an absolute standard deviation (ConceptVectors uses 0.1 on
  LLaMA-2-7B, whose value vectors have norms near 1);
- `relative_to="vector"`: `s = sigma * |v| / sqrt(d_model)`, so the noise vector's expected
  squared norm is `sigma^2 |v|^2`: noise of relative size about `sigma` of that vector;
- `relative_to="layer"`: the same with the median row norm of the layer's `W_out` in place of
  `|v|`, so vectors with small norms get the same noise as their neighbours.

The relative forms let one `sigma` mean the same across models whose weight scales differ
(SmolLM2's and Gemma's value vectors are far from unit norm). Noise is drawn on the CPU in
float32 from a seeded generator, so it is the same on every device; it is added in float32
and rounded to the weight's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

__all__ = [
    "WeightEdit",
    "add_noise",
    "edit_parameter",
    "scale_value_vector",
    "set_value_vector",
    "value_vector",
    "value_vector_name",
    "zero_value_vector",
]


class WeightEdit:
    """Weights an edit changed, with their original values; undoable.

    `restore()` writes the original values back (in place, into the same tensors). Also a
    context manager: `with add_noise(model, ...): ...` restores on exit.

    Attributes:
        model: the edited model.
        originals: `{parameter name: original values}`; for a partial edit, the values of
            `parameter[indices[name]]` only.
        indices: `{parameter name: index}` for partial edits (absent: the whole parameter).
        record: a JSON-able description (`kind` plus the edit's settings).
        restored: whether `restore()` has run.
    """

    def __init__(self, model: nn.Module, originals: dict[str, Tensor],
                 record: Mapping[str, Any] | None = None,
                 indices: Mapping[str, Any] | None = None):
        self.model = model
        self.originals = originals
        self.indices = dict(indices or {})
        self.record = dict(record or {"kind": "edit"})
        self.restored = False

    def restore(self) -> None:
        """Write the original values back into the model's parameters."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.originals.items():
                if name in self.indices:
                    params[name][self.indices[name]] = value
                else:
                    params[name].copy_(value)
        self.restored = True

    def __enter__(self) -> WeightEdit:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.restored:
            self.restore()

    def __repr__(self) -> str:
        kind = self.record.get("kind", "edit")
        return f"WeightEdit({kind}, {len(self.originals)} parameters, restored={self.restored})"


@torch.no_grad()
def edit_parameter(
    model: nn.Module, name: str, index: Any, value: Tensor, record: Mapping[str, Any]
) -> WeightEdit:
    """Set `parameter[index] = value` (cast to the parameter's dtype) and record the edit.

    The building block of the value-vector edits; usable for any parameter slice.
    """
    params = dict(model.named_parameters())
    if name not in params:
        raise ValueError(f"{name} is not a parameter of the model (e.g. "
                         f"{', '.join(list(params)[:4])})")
    p = params[name]
    original = p[index].detach().clone()
    value = torch.as_tensor(value)
    if value.shape != original.shape:
        raise ValueError(f"the new value has shape {tuple(value.shape)} but {name}[{index!r}] "
                         f"has shape {tuple(original.shape)}")
    p[index] = value.to(device=p.device, dtype=p.dtype)
    return WeightEdit(model, {name: original}, dict(record, parameter=name), {name: index})


def value_vector_name(model: nn.Module, layer: int) -> str:
    """`blocks.{layer}.mlp.W_out`, after checking the layer exists."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {cfg.n_layers} layers")
    name = f"blocks.{layer}.mlp.W_out"
    if name not in dict(model.named_parameters()):
        raise ValueError(f"the model has no parameter {name} (a mixture-of-experts MLP, or "
                         "LoRA adapters on it: merge_lora(model) first)")
    return name


def _check_index(model: nn.Module, index: int) -> None:
    if not 0 <= index < model.cfg.d_mlp:
        raise ValueError(f"value vector {index} is out of range: d_mlp is {model.cfg.d_mlp}")


def value_vector(model: nn.Module, layer: int, index: int) -> Float[Tensor, " d_model"]:
    """A copy of value vector `index` of layer `layer`: `blocks.{layer}.mlp.W_out[index]`."""
    name = value_vector_name(model, layer)
    _check_index(model, index)
    return dict(model.named_parameters())[name][index].detach().clone()


def add_noise(
    model: nn.Module,
    layer: int,
    index: int,
    sigma: float,
    relative_to: Literal["vector", "layer"] | None = "vector",
    seed: int = 0,
) -> WeightEdit:
    """Add Gaussian noise to one value vector (see the module docstring for the scales).

    Args:
        model: edited in place.
        layer, index: the vector `blocks.{layer}.mlp.W_out[index, :]`.
        sigma: the noise scale: an absolute standard deviation (`relative_to=None`) or a
            fraction of the vector's norm (`"vector"`) or of the layer's median row norm
            (`"layer"`).
        relative_to: see above.
        seed: seeds the noise (drawn on the CPU, so identical on every device).

    Returns:
        A `WeightEdit` whose record holds the per-coordinate std used and the noise norm.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if relative_to not in (None, "vector", "layer"):
        raise ValueError(f"relative_to must be None, 'vector' or 'layer', got {relative_to!r}")
    name = value_vector_name(model, layer)
    _check_index(model, index)
    weight = dict(model.named_parameters())[name]
    v = weight[index].detach().float()
    d_model = v.shape[-1]
    if relative_to is None:
        std = float(sigma)
    elif relative_to == "vector":
        std = float(sigma * v.norm() / math.sqrt(d_model))
    else:
        std = float(sigma * weight.detach().float().norm(dim=-1).median() / math.sqrt(d_model))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(d_model, generator=gen) * std
    record = {"kind": "add_noise", "layer": layer, "index": index, "sigma": sigma,
              "relative_to": relative_to, "std": std, "seed": seed,
              "noise_norm": float(noise.norm()), "vector_norm": float(v.norm())}
    return edit_parameter(model, name, index, v + noise.to(v.device), record)


def set_value_vector(model: nn.Module, layer: int, index: int,
                     value: Float[Tensor, " d_model"]) -> WeightEdit:
    """Replace value vector `index` of layer `layer` by `value`."""
    name = value_vector_name(model, layer)
    _check_index(model, index)
    value = torch.as_tensor(value)
    record = {"kind": "set_value_vector", "layer": layer, "index": index,
              "value_norm": float(value.float().norm())}
    return edit_parameter(model, name, index, value, record)


def scale_value_vector(model: nn.Module, layer: int, index: int, factor: float) -> WeightEdit:
    """Multiply value vector `index` of layer `layer` by `factor` (in float32, then rounded)."""
    v = value_vector(model, layer, index)
    record = {"kind": "scale_value_vector", "layer": layer, "index": index, "factor": factor}
    return edit_parameter(model, value_vector_name(model, layer), index, v.float() * factor, record)


def zero_value_vector(model: nn.Module, layer: int, index: int) -> WeightEdit:
    """Set value vector `index` of layer `layer` to zero (the neuron then writes nothing)."""
    v = value_vector(model, layer, index)
    record = {"kind": "zero_value_vector", "layer": layer, "index": index}
    return edit_parameter(model, value_vector_name(model, layer), index, torch.zeros_like(v), record)
