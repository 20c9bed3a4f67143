"""Shared fixtures. The embedded models' HF references are loaded once per session (dequantising
a GGUF file takes 20-70 s on 2 cores); converted HookedTransformers come from interp's cache."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp import models
from interp.attribution.metrics import LogitDiff


@pytest.fixture(scope="session")
def hf_reference():
    """name -> (HF model, HF tokenizer) of an embedded model, loaded on first use."""
    loaded: dict[str, tuple] = {}

    def get(name: str):
        if name not in loaded:  # both embedded models together fit in ~2 GB
            loaded[name] = models.load_hf(name)
        return loaded[name]

    yield get
    loaded.clear()


@pytest.fixture(scope="session")
def default_model():
    """The default embedded model, processed, float32, CPU (shared: do not leave hooks on it)."""
    model = models.load(models.DEFAULT_MODEL, device="cpu")
    yield model
    model.reset_hooks()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
