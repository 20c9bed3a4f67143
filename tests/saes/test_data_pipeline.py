"""Corpus contexts and the on-disk activation cache that SAELens's runner reads."""

from __future__ import annotations

import pytest
import torch

from interp.saes import cache_activations, corpus_contexts, load_activations
from interp.saes.corpus import split_contexts


def test_split_contexts_with_and_without_bos():
    stream = torch.arange(10)
    assert split_contexts(stream, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_contexts(stream, 4, bos_token_id=99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    with pytest.raises(ValueError, match="fewer than one context"):
        split_contexts(torch.arange(3), 4)


def test_corpus_contexts_sample_shuffled_windows_of_each_split(tiny):
    train = corpus_contexts(tiny, "train", context_size=32, n_tokens=1000, seed=0)
    assert train.shape == (32, 32) and train.max() < 256  # bytes for a model without tokenizer
    again = corpus_contexts(tiny, "train", context_size=32, n_tokens=1000, seed=0)
    other = corpus_contexts(tiny, "train", context_size=32, n_tokens=1000, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)
    held = corpus_contexts(tiny, "heldout", context_size=32, seed=0)
    train_all = corpus_contexts(tiny, "train", context_size=32, seed=0)
    seen = {tuple(r) for r in train_all.tolist()}
    assert sum(tuple(r) in seen for r in held.tolist()) < 0.01 * held.shape[0]
    with pytest.raises(ValueError, match="has only"):
        corpus_contexts(tiny, "heldout", context_size=32, n_tokens=10**9)


def test_activation_cache_holds_the_model_activations_and_is_reused(tiny, tmp_path):
    tokens = corpus_contexts(tiny, "train", context_size=16, n_tokens=160)
    hooks = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]
    info = cache_activations(tiny, tokens, hooks, tmp_path / "acts", skip_first=2, batch_size=3,
                             verbose=False)
    assert info.positions == 14 and info.n_tokens == 10 * 14 and info.d_in == {h: 64 for h in hooks}
    _, cache = tiny.run_with_cache(tokens, names_filter=hooks)
    for h in hooks:
        torch.testing.assert_close(load_activations(info.path, h), cache[h][:, 2:].reshape(-1, 64))
    again = cache_activations(tiny, tokens, hooks[:1], tmp_path / "acts", skip_first=2, verbose=False)
    assert again == info  # found on disk, not recomputed
    with pytest.raises(ValueError, match="no 'blocks.0.hook_resid_pre'"):
        load_activations(info.path, "blocks.0.hook_resid_pre")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an interp activation cache"):
        cache_activations(tiny, tokens, hooks, tmp_path / "precious", verbose=False)
    assert (tmp_path / "precious" / "notes.txt").exists()


def test_model_tag_names_embedded_models_by_their_interp_name(default_model, tiny):
    from interp.saes.activations import model_tag

    assert model_tag(default_model) == "smollm2-135m-instruct"  # cfg.model_name is a GGUF dir
    assert model_tag(tiny) == "tiny-llama"
