"""Fixtures for the attribution tests: random prompt pairs and a model that is linear."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp.attribution.metrics import LogitDiff


def _random_pairs(model, batch=3, pos=6, seed=0):
    """Random clean/corrupt token batches, random answers, metric normalised on this model."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupt = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    answer = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    wrong = (answer + 1) % model.cfg.d_vocab
    return clean, corrupt, LogitDiff(answer, wrong).normalised(model, clean, corrupt)


@pytest.fixture
def random_pairs():
    return _random_pairs


@pytest.fixture
def linear_model() -> HookedTransformer:
    """No normalisation; W_Q = W_K = 0 so every attention pattern is the fixed uniform causal
    one; W_in = b_in = 0 so each MLP writes a constant. The logits are then affine in every
    activation (and in the embeddings), so first-order estimates must be exact."""
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16,
                                  d_vocab=50, act_fn="gelu", normalization_type=None, seed=1)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.W_Q, block.attn.W_K, block.attn.b_Q, block.attn.b_K,
                      block.mlp.W_in, block.mlp.b_in):
                p.zero_()
    return model.eval()
