"""Fixtures for the SAE tests: tiny models, planted SAEs with known behaviour, one CPU thread.

The SAE tests run many small matrix products; on a shared 2-core machine two torch threads
oversubscribe the cores and make them several times slower, so they run on one thread.
"""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

from interp import models


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """tiny-llama (d_model 64, 2 layers, bytes as tokens), processed weights."""
    model = models.load("tiny-llama", device="cpu")
    yield model
    model.reset_hooks()


def random_topk_sae(d_in: int, d_sae: int, k: int, hook_name: str | None = None, seed: int = 0) -> TopKSAE:
    """A TopK SAE with random weights (a poor reconstruction: attaching it without the error
    term changes the model a lot)."""
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) / d_in**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
    if hook_name:
        sae.cfg.metadata.hook_name = hook_name
    return sae


def identity_sae(d_in: int, n_dead: int = 0, hook_name: str | None = None) -> StandardSAE:
    """A planted ReLU SAE that reconstructs exactly: latent i = relu(x_i), latent d_in + i =
    relu(-x_i), decoder rows +e_i / -e_i; plus `n_dead` latents that can never fire (zero
    encoder column, bias -1)."""
    d_sae = 2 * d_in + n_dead
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, :d_in] = eye
        sae.W_enc[:, d_in:2 * d_in] = -eye
        sae.b_enc.zero_()
        sae.b_enc[2 * d_in:] = -1.0
        sae.W_dec.zero_()
        sae.W_dec[:d_in] = eye
        sae.W_dec[d_in:2 * d_in] = -eye
        sae.W_dec[2 * d_in:] = torch.randn(n_dead, d_in)
        sae.b_dec.zero_()
    if hook_name:
        sae.cfg.metadata.hook_name = hook_name
    return sae


@pytest.fixture
def make_topk_sae():
    """`random_topk_sae` as a fixture (test modules cannot import conftest)."""
    return random_topk_sae


@pytest.fixture
def make_identity_sae():
    """`identity_sae` as a fixture."""
    return identity_sae
