"""Loading SAEs: local directories round-trip, missing ones and unknown releases fail clearly,
an uncached pretrained SAE fails fast offline."""

from __future__ import annotations

import pytest
import torch

from interp.saes import (
    HubUnreachableError,
    SAENotFoundError,
    attach,
    list_local,
    load_local,
    load_pretrained,
    load_sae,
)


def test_local_round_trip(tmp_path, make_topk_sae):
    sae = make_topk_sae(64, 128, 4, "blocks.1.hook_resid_pre")
    sae.save_model(tmp_path / "my_sae")
    loaded = load_sae(tmp_path / "my_sae")
    assert type(loaded) is type(sae) and loaded.cfg.k == 4
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    for name, p in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    assert list_local(tmp_path) == [tmp_path / "my_sae"]


def test_missing_local_sae_is_a_clear_error(tmp_path):
    with pytest.raises(SAENotFoundError, match=r"No SAE at .*nowhere: it does not exist.*cfg.json"):
        load_local(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "cfg.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks sae_weights.safetensors"):
        load_local(tmp_path / "half")


def test_unknown_release_or_id_is_reported_offline_with_close_matches():
    with pytest.raises(SAENotFoundError, match=r"Unknown SAELens release 'gpt2-small-res-j'.*gpt2-small-res-jb"):
        load_pretrained("gpt2-small-res-j", "blocks.0.hook_resid_pre")
    with pytest.raises(SAENotFoundError, match=r"no SAE with id 'blocks.0.hook_resid_pree'.*blocks.0.hook_resid_pre"):
        load_pretrained("gpt2-small-res-jb", "blocks.0.hook_resid_pree")


def test_uncached_pretrained_sae_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(HubUnreachableError, match=r"gpt2-small-res-jb.*not in the local Hugging Face cache.*load_local"):
        load_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")


@pytest.mark.online
def test_pretrained_sae_attaches_to_gpt2():
    from interp import models

    try:
        sae = load_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
        model = models.load("gpt2", device="cpu")
    except HubUnreachableError as exc:
        pytest.skip(f"Hub unreachable: {exc}")
    tokens = model.to_tokens("The quick brown fox jumps over the lazy dog")
    clean = model(tokens)
    with attach(model, [sae]) as att:
        observed, cache = model.run_with_cache(tokens, names_filter=att.hook_names())
    torch.testing.assert_close(observed, clean, atol=1e-3, rtol=1e-4)
    assert cache[att.hook_names()[0]].shape[-1] == sae.cfg.d_sae
