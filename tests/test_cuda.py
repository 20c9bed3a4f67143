"""The same numbers on CUDA as on the CPU: exact patching, AtP, RelP, IG and generation.

Every test here is marked `cuda` and takes the `device` fixture, which skips it where torch
sees no GPU; `scripts/gpu_check.sh` runs them (`pytest -m cuda`) on a GPU machine. The CPU
result in float32 is the reference each time, computed by the same code on the same inputs
with the metric normalised once (on the CPU), so only the device's arithmetic differs.

Tolerances:
- float32: max |CUDA - CPU| <= 1e-4 on scores of the normalised metric (order 1). CUDA and
  the CPU sum in different orders, which moves float32 results by about 1e-6 per layer;
  TF32 matmuls (off by default in torch) would break this and are turned off here.
- bfloat16 (8-bit mantissa, rounding error 2^-9 per operation): max |bf16 CUDA - float32 CPU|
  <= 8% of the largest CPU score, and Pearson r >= 0.995 over all sites of a family. Measured
  with bfloat16 on the CPU for these tiny models: at most 3.5% and r >= 0.9996.
"""

from __future__ import annotations

import pytest
import torch

from interp import hooks, models
from interp.attribution.atp import attribution_patching
from interp.attribution.ig import integrated_gradients
from interp.attribution.metrics import LogitDiff
from interp.attribution.patching import exact_patching
from interp.attribution.relp import relp
from interp.generation import generate_with

pytestmark = pytest.mark.cuda

FAMILIES = ("resid", "attn", "mlp", "heads")
METHODS = {
    "exact": lambda m, c, x, metric: exact_patching(m, c, x, metric, FAMILIES, progress=False),
    "atp": lambda m, c, x, metric: attribution_patching(m, c, x, metric, FAMILIES),
    "relp": lambda m, c, x, metric: relp(m, c, x, metric, FAMILIES),
    "ig": lambda m, c, x, metric: integrated_gradients(m, c, x, metric, FAMILIES, steps=4),
}
BF16_RELATIVE, BF16_PEARSON = 0.08, 0.995


@pytest.fixture(autouse=True)
def _full_float32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _pairs(model, batch: int = 3, pos: int = 7, seed: int = 0):
    """Random clean/corrupt tokens and answers; the metric normalised on the CPU model."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupt = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    answer = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    metric = LogitDiff(answer, (answer + 1) % model.cfg.d_vocab).normalised(model, clean, corrupt)
    return clean, corrupt, metric


def _on(scores: dict) -> dict[str, torch.Tensor]:
    return {f: s.values.detach().float().cpu() for f, s in scores.items()}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_methods_give_the_cpu_numbers_in_float32(name, method, device):
    cpu_model = models.load(name, device="cpu")
    gpu_model = models.load(name, device=device)
    assert gpu_model.W_E.device.type == "cuda"
    clean, corrupt, metric = _pairs(cpu_model)
    expected = _on(METHODS[method](cpu_model, clean, corrupt, metric))
    got = _on(METHODS[method](gpu_model, clean.to(device), corrupt.to(device), metric.to(device)))
    for family in FAMILIES:
        assert expected[family].abs().max() > 1e-2  # the check is not vacuous
        torch.testing.assert_close(got[family], expected[family], atol=1e-4, rtol=0,
                                   msg=lambda m, f=family: f"{name} {method} {f}: {m}")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_methods_in_bfloat16_stay_close_to_the_cpu(name, method, device):
    cpu_model = models.load(name, device="cpu")
    gpu_model = models.load(name, device=device, dtype="bfloat16")
    assert gpu_model.W_E.dtype == torch.bfloat16
    clean, corrupt, metric = _pairs(cpu_model)
    expected = _on(METHODS[method](cpu_model, clean, corrupt, metric))
    got = _on(METHODS[method](gpu_model, clean.to(device), corrupt.to(device), metric.to(device)))
    for family in FAMILIES:
        x, y = expected[family].flatten(), got[family].flatten()
        worst = (x - y).abs().max() / x.abs().max()
        r = torch.corrcoef(torch.stack([x, y]))[0, 1]
        assert worst <= BF16_RELATIVE and r >= BF16_PEARSON, (name, method, family, worst, r)


def test_default_model_exact_patching_on_cuda(device, load_or_skip):
    """SmolLM2 on one IOI pair (skipped where the model package is not installed)."""
    from interp.tasks import generate_ioi

    cpu_model = load_or_skip(models.DEFAULT_MODEL, device="cpu")
    gpu_model = models.load(models.DEFAULT_MODEL, device=device)
    group = generate_ioi(cpu_model, 1, seed=0)
    metric = group.metric(cpu_model)
    clean, corrupt = group.clean_tokens, group.corrupt_tokens
    expected = _on(exact_patching(cpu_model, clean, corrupt, metric, ("attn", "heads"),
                                  progress=False))
    got = _on(exact_patching(gpu_model, clean.to(device), corrupt.to(device), metric.to(device),
                             ("attn", "heads"), progress=False))
    for family in ("attn", "heads"):
        torch.testing.assert_close(got[family], expected[family], atol=1e-4, rtol=0)


def _generate(model, prompts, device, vector):
    with hooks.steer(model, vector.to(device), layers=[1], scale=2.0):
        steered = generate_with(model, prompts, max_new_tokens=8, progress=False)
    return generate_with(model, prompts, max_new_tokens=8, progress=False), steered


def test_generation_on_cuda_matches_the_cpu(device):
    """Greedy completions, batched with left padding and a KV cache, with and without a
    steering hook: the same tokens on both devices (float32)."""
    cpu_model = models.load("tiny-llama", device="cpu")
    gpu_model = models.load("tiny-llama", device=device)
    prompts = [[5, 17, 33, 2], [9, 1], [200, 13, 7, 7, 41]]  # different lengths: left padding
    vector = torch.randn(cpu_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    plain_cpu, steered_cpu = _generate(cpu_model, prompts, "cpu", vector)
    plain_gpu, steered_gpu = _generate(gpu_model, prompts, device, vector)
    assert plain_gpu.tokens == plain_cpu.tokens
    assert steered_gpu.tokens == steered_cpu.tokens
    assert steered_cpu.tokens != plain_cpu.tokens  # the hook acts
    assert all(len(t) == 8 for t in plain_gpu.tokens)


def test_default_model_chat_generation_on_cuda(device, load_or_skip):
    cpu_model = load_or_skip(models.DEFAULT_MODEL, device="cpu")
    gpu_model = models.load(models.DEFAULT_MODEL, device=device)
    prompts = ["What is the capital of France?", "Name three colours."]
    cpu = generate_with(cpu_model, prompts, max_new_tokens=12, chat=True, progress=False)
    gpu = generate_with(gpu_model, prompts, max_new_tokens=12, chat=True, progress=False)
    assert gpu.texts == cpu.texts and all(gpu.texts)
