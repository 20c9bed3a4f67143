"""Training: a TopK SAE recovers planted sparse features; SAELens's runner trains, saves and
reloads an SAE on a tiny model, the same with cached or streamed activations; seeds fix runs."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig

from interp.saes import load_local, train_on_activations, train_sae
from interp.saes.train import to_inference, training_sae_config


def _planted(n: int = 8192, d: int = 32, n_features: int = 64, per_sample: float = 3.0, seed: int = 0):
    """Unit directions D and samples that are sparse non-negative combinations of them."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d, generator=gen)
    directions /= directions.norm(dim=-1, keepdim=True)
    on = torch.rand(n, n_features, generator=gen) < per_sample / n_features
    magnitude = 0.5 + 1.5 * torch.rand(n, n_features, generator=gen)
    return directions, (on * magnitude) @ directions


def _recovered(directions, sae, threshold: float = 0.9) -> float:
    dec = sae.W_dec.detach()
    dec = dec / dec.norm(dim=-1, keepdim=True)
    return ((directions @ dec.T).max(dim=1).values > threshold).float().mean().item()


def test_topk_sae_recovers_planted_sparse_features():
    directions, acts = _planted()
    sae = train_on_activations(acts, "topk", d_sae=128, k=4, epochs=8, batch_size=256, lr=1e-2)
    assert isinstance(sae, TopKSAE)
    assert _recovered(directions, sae) >= 0.9
    # the check can fail: an untrained SAE of the same shape recovers almost nothing
    untrained = TopKSAE(TopKSAEConfig(d_in=32, d_sae=128, k=4))
    assert _recovered(directions, untrained) < 0.1


def test_train_on_activations_is_deterministic_given_a_seed():
    _, acts = _planted(n=2048, d=16, n_features=32)
    a = train_on_activations(acts, "topk", 32, 2, epochs=2, batch_size=256, seed=3)
    b = train_on_activations(acts, "topk", 32, 2, epochs=2, batch_size=256, seed=3)
    c = train_on_activations(acts, "topk", 32, 2, epochs=2, batch_size=256, seed=4)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)
    assert not torch.equal(a.W_dec, c.W_dec)


def _fve(sae, x):
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    return 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def test_to_inference_keeps_the_function_of_a_batchtopk_sae():
    from sae_lens import BatchTopKTrainingSAE

    _, acts = _planted(n=2048, d=16, n_features=32)
    torch.manual_seed(0)
    training = BatchTopKTrainingSAE(training_sae_config("batchtopk", 16, 32, k=3,
                                                        normalize_activations="none"))
    with torch.no_grad():
        training.topk_threshold.fill_(0.05)
    sae = to_inference(training)
    assert sae.cfg.architecture() == "jumprelu"
    with torch.no_grad():
        pre = (acts - training.b_dec) @ training.W_enc + training.b_enc
        pre = pre * training.W_dec.norm(dim=-1)  # rescale_acts_by_decoder_norm
        expected = torch.where(pre > 0.05, pre, torch.zeros_like(pre)) / training.W_dec.norm(dim=-1)
        recon = expected @ training.W_dec + training.b_dec
    torch.testing.assert_close(sae.decode(sae.encode(acts)).detach(), recon, atol=1e-5, rtol=1e-4)


def test_train_sae_on_a_tiny_model_cached_and_streamed(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path / "cache"))
    kwargs = dict(d_sae=128, k=8, n_tokens=4096, context_size=64, epochs=10,
                  batch_size_tokens=256, eval_tokens=1024, eval_ce_tokens=512, verbose=False)
    sae, report = train_sae(tiny, "blocks.1.hook_resid_pre", "topk", out_dir=tmp_path / "a", **kwargs)
    # saved and loaded back
    loaded = load_local(tmp_path / "a")
    for name, p in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    saved = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert saved["quality"]["fve"] == pytest.approx(report.quality.fve)
    assert (tmp_path / "a" / "runner_cfg.json").exists()
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    assert list(loaded.cfg.metadata.seqpos_slice) == [1, None]
    assert report.n_tokens == 64 * 63 and report.steps == 64 * 63 * 10 // 256
    assert report.activation_cache and str(tmp_path / "cache") in report.activation_cache
    # it learnt something: the held-out reconstruction beats the mean, with k latents per token
    q = report.quality
    assert q.fve > 0.3 and q.l0 == pytest.approx(8.0)
    # streaming the activations through SAELens's store gives the very same SAE
    streamed, report2 = train_sae(tiny, "blocks.1.hook_resid_pre", "topk", out_dir=tmp_path / "b",
                                  activations="stream", **kwargs)
    assert torch.equal(streamed.W_dec, sae.W_dec)
    assert report2.quality.fve == pytest.approx(q.fve)


def test_train_sae_batchtopk_saves_a_jumprelu_sae(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path / "cache"))
    sae, report = train_sae(tiny, "blocks.0.hook_mlp_out", "batchtopk", d_sae=128, k=8,
                            n_tokens=4096, context_size=64, epochs=10, batch_size_tokens=256,
                            eval_tokens=1024, eval_ce_tokens=512, out_dir=tmp_path / "b",
                            verbose=False)
    assert report.saved_architecture == "jumprelu" == load_local(tmp_path / "b").cfg.architecture()
    assert 2 < report.quality.l0 < 32  # the learnt threshold keeps it near k=8


def test_bad_training_arguments_are_clear(tiny):
    with pytest.raises(ValueError, match=r"Unknown SAE architecture 'topkk'.*topk"):
        training_sae_config("topkk", 64, 128)
    with pytest.raises(ValueError, match=r"no field\(s\) \['l1_coeff'\]"):
        training_sae_config("standard", 64, 128, l1_coeff=1.0)
    with pytest.raises(ValueError, match=r"no hook point 'blocks.9.hook_resid_pre'"):
        train_sae(tiny, "blocks.9.hook_resid_pre", verbose=False)
