"""`inference_layout`: TransformerLens's per-call weight rearrangements become views, outputs
and gradients stay bit-identical, and the standard layout comes back on exit."""

from __future__ import annotations

import einops
import pytest
import torch

from interp import models
from interp.layout import inference_layout

# TransformerLens's own per-call rearrangements (components/mlps/gated_mlp.py,
# utilities/attention.py, components/abstract_attention.py), written out independently
REARRANGE = {
    "W_gate": lambda w: w.T.contiguous(),
    "W_in": lambda w: w.T.contiguous(),
    "W_out": lambda w: w.T.contiguous(),
    "W_Q": lambda w: einops.rearrange(w, "h m d -> (h d) m").contiguous(),
    "_W_K": lambda w: einops.rearrange(w, "h m d -> (h d) m").contiguous(),
    "_W_V": lambda w: einops.rearrange(w, "h m d -> (h d) m").contiguous(),
    "W_K": lambda w: einops.rearrange(w, "h m d -> (h d) m").contiguous(),
    "W_V": lambda w: einops.rearrange(w, "h m d -> (h d) m").contiguous(),
    "W_O": lambda w: einops.rearrange(w, "h d m -> m (h d)").contiguous(),
}


def _weights(model):
    for block in model.blocks:
        for module in (block.attn, block.mlp):
            for name, param in module._parameters.items():
                if name in REARRANGE:
                    yield name, param


def _logits_and_grads(model, tokens):
    model.zero_grad()
    logits = model(tokens)
    logits[:, -1].logsumexp(-1).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gated_llama_weights_need_no_copy_inside_and_outputs_are_bit_identical():
    model = models.load("tiny-llama")
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    before = {id(p): p.detach().clone() for _, p in _weights(model)}
    logits, grads = _logits_and_grads(model, tokens)
    with inference_layout(model):
        copied = [n for n, p in _weights(model) if REARRANGE[n](p).data_ptr() != p.data_ptr()]
        assert not copied, f"still copied per call: {copied}"
        inside, grads_inside = _logits_and_grads(model, tokens)
    assert torch.equal(inside, logits)
    assert grads_inside.keys() == grads.keys()
    assert all(torch.equal(grads_inside[n], grads[n]) for n in grads)
    # outside again: the standard layout, the same values
    names = [n for n, _ in _weights(model)]
    assert {"W_gate", "W_in", "W_out", "W_Q", "_W_K", "W_O"} <= set(names)
    for _, p in _weights(model):
        assert p.is_contiguous() and torch.equal(p, before[id(p)])
    assert any(REARRANGE[n](p).data_ptr() != p.data_ptr() for n, p in _weights(model))


def test_plain_mlp_weights_are_left_alone_and_the_layout_comes_back_after_an_error():
    model = models.load("tiny-gpt2")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
    with pytest.raises(RuntimeError, match="inside"):
        with inference_layout(model):
            assert model.blocks[0].mlp.W_in.is_contiguous()  # addmm reads it as it is
            assert not model.blocks[0].attn.W_Q.is_contiguous()
            with torch.no_grad():
                assert torch.equal(model(tokens), logits)
            raise RuntimeError("inside")
    assert all(p.is_contiguous() for p in model.parameters())


def test_nested_contexts_keep_the_layout_until_the_outer_one_ends():
    model = models.load("tiny-llama")
    w = model.blocks[0].mlp.W_in
    with inference_layout(model):
        with inference_layout(model):
            assert not w.is_contiguous()
        assert not w.is_contiguous()
    assert w.is_contiguous()
