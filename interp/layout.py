"""Weight layouts that spare TransformerLens's per-call weight copies.

TransformerLens rearranges some weights on every forward call and copies them into a fresh
contiguous tensor: the gated MLP calls `W.T.contiguous()` on `W_gate`, `W_in` and `W_out`,
the attention reshapes `W_Q`, `W_K`, `W_V` to `[(head d_head), d_model]` and `W_O` to
`[d_model, (head d_head)]`, and the unembedding calls `W_U.T.contiguous()` (the largest of
them: `[d_vocab, d_model]`, copied on every forward pass, one generated token included). For one large batch that is noise, but exact patching runs many
small block calls (one per layer and chunk of sites), and on a CPU these copies were about a
third of each call (measured on SmolLM2: 15 copies, ~7 ms of a ~19 ms block call).

`inference_layout(model)` stores each of these weights in the memory order its rearranged
form needs (the same values, only the strides change), so the rearrangement is a view and
`.contiguous()` returns the tensor itself. The matrix products then see exactly the tensors
they saw before, so outputs are bit-identical. On exit every weight is made contiguous again,
in the layout TransformerLens gave it.

Caveat: code that reads these weights directly inside the context (e.g. `W_in @ x` in a user
hook) gets a tensor with unusual strides; the values are the same but a matrix product may
pick a different kernel and differ in the last bits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from transformer_lens import HookedTransformer

# (module attribute, parameter name, axis order whose contiguous form TransformerLens builds)
_REARRANGED: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("mlp", "W_gate", (1, 0)),  # W.T.contiguous()
    ("mlp", "W_in", (1, 0)),
    ("mlp", "W_out", (1, 0)),
    ("attn", "W_Q", (0, 2, 1)),  # head d_model d_head -> (head d_head) d_model
    ("attn", "W_K", (0, 2, 1)),
    ("attn", "W_V", (0, 2, 1)),
    ("attn", "_W_K", (0, 2, 1)),  # grouped-query attention keeps the kv heads here
    ("attn", "_W_V", (0, 2, 1)),
    ("attn", "W_O", (2, 0, 1)),  # head d_head d_model -> d_model (head d_head)
)


def _in_order(weight: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """The same values as `weight`, stored so that `weight.permute(order)` is contiguous."""
    inverse = tuple(order.index(i) for i in range(len(order)))
    return weight.detach().permute(order).contiguous().permute(inverse)


def _rearranged_weights(model: HookedTransformer) -> Iterator[tuple[torch.nn.Parameter, tuple[int, ...]]]:
    """The parameters TransformerLens rearranges per call, with their target axis order.

    Only gated MLPs copy their weights (the plain MLP's `addmm` reads a transposed matrix
    directly), so the MLP weights of other MLP classes are left alone. The unembedding's
    `W_U` is copied by every model.
    """
    unembed = getattr(model, "unembed", None)
    param = unembed._parameters.get("W_U") if unembed is not None else None
    if param is not None and param.ndim == 2 and param.is_contiguous():
        yield param, (1, 0)  # F.linear(x, W_U.T.contiguous(), b_U)
    for block in model.blocks:
        for module_name, param_name, order in _REARRANGED:
            module = getattr(block, module_name, None)
            if module is None or (module_name == "mlp" and not hasattr(module, "W_gate")):
                continue
            param = module._parameters.get(param_name)
            if param is not None and param.ndim == len(order) and param.is_contiguous():
                yield param, order


@contextmanager
def inference_layout(
    model: HookedTransformer, keep_originals: bool = False
) -> Iterator[HookedTransformer]:
    """Within the context, the model's rearranged weights need no per-call copy.

    Outputs are bit-identical to the standard layout; gradients flow as usual. Weights are
    made contiguous again on exit, also when the body raises. Inside an enclosing
    `inference_layout` the weights are already laid out and nothing is done.

    Args:
        model: the model.
        keep_originals: hold on to the original weight tensors and put them back on exit,
            instead of copying every weight back into its standard layout: exit costs nothing,
            but the laid-out weights take memory beside the originals while the context lasts.
            A weight changed in place inside the context (`with torch.no_grad(): w.copy_(...)`,
            which moves its version counter) is copied back as usual, so the change is kept;
            writes through `w.data` are not seen.
    """
    params = list(_rearranged_weights(model))
    originals = []
    try:
        for param, order in params:
            original = param.data
            param.data = _in_order(original, order)
            originals.append((original, param._version) if keep_originals else None)
        yield model
    finally:
        for (param, _), kept in zip(params, originals):
            if kept is not None and param._version == kept[1]:
                param.data = kept[0]
            else:
                param.data = param.data.contiguous()
