"""Shared fixtures. The embedded models' HF references are loaded once per session (dequantising
a GGUF file takes 20-70 s on 2 cores); converted HookedTransformers come from interp's cache."""

from __future__ import annotations

import pytest
import torch

from interp import models


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
