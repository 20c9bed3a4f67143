"""Activation collection: pooling against run_with_cache on each text alone, padding invariance,
determinism, stopping early, chunked disk output that resumes, and the errors."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from interp import models
from interp.concepts.collect import Activations, ActivationsMismatchError, collect

# `interp.concepts.collect` is the function (re-exported by the package); this is the module.
collect_module = importlib.import_module("interp.concepts.collect")

#: Texts of very different lengths, as token ids (the tiny models have no tokenizer).
IDS = [[5, 17, 3, 99, 42, 7, 11, 200, 13], [8, 9], [31, 32, 33, 34], [250], [60, 61, 62, 63, 64, 65]]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    """Both position schemes: rotary (llama) and learned absolute positions (gpt2)."""
    return models.load(request.param, device="cpu")


def _alone(model, ids, name):
    """[pos, d] activation of one unpadded text, computed independently of `collect`."""
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[name])
    act = cache[name][0]
    return act.reshape(act.shape[0], -1)


def test_last_token_does_not_depend_on_padding_or_batch(tiny):
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    batched = collect(tiny, IDS, names, layers=None, batch_size=len(IDS), progress=False)
    single = collect(tiny, IDS, names, layers=None, batch_size=1, progress=False)
    for name in names:
        assert batched[name].shape == (len(IDS), _alone(tiny, IDS[0], name).shape[1])
        for i, ids in enumerate(IDS):
            ref = _alone(tiny, ids, name)[-1]
            torch.testing.assert_close(batched[name][i], ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(single[name][i], ref, atol=1e-4, rtol=0)
    assert batched.n_tokens.tolist() == [len(x) for x in IDS]


def test_mean_and_position_pooling_match_the_unpadded_run(tiny):
    name = "blocks.1.hook_resid_post"
    mean = collect(tiny, IDS, name, layers=None, pool="mean", batch_size=5, progress=False)
    first = collect(tiny, IDS, name, layers=None, pool=0, batch_size=5, progress=False)
    second_last = collect(tiny, [x for x in IDS if len(x) >= 2], name, layers=None, pool=-2,
                          batch_size=5, progress=False)
    kept = [x for x in IDS if len(x) >= 2]
    for i, ids in enumerate(IDS):
        ref = _alone(tiny, ids, name)
        torch.testing.assert_close(mean[name][i], ref.mean(0), atol=1e-4, rtol=0)
        torch.testing.assert_close(first[name][i], ref[0], atol=1e-4, rtol=0)
    for i, ids in enumerate(kept):
        torch.testing.assert_close(second_last[name][i], _alone(tiny, ids, name)[-2], atol=1e-4, rtol=0)


def test_collection_is_deterministic():
    model = models.load("tiny-llama", device="cpu")
    a = collect(model, IDS, "resid_post", batch_size=2, progress=False)
    b = collect(model, IDS, "resid_post", batch_size=2, progress=False)
    for name in a.hook_names:
        assert torch.equal(a[name], b[name])
    other = models.load("tiny-llama", device="cpu", seed=1)  # other weights, other numbers
    c = collect(other, IDS, "resid_post", batch_size=2, progress=False)
    assert not torch.allclose(a["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_post"])


def test_stops_after_the_last_needed_block():
    model = models.load("tiny-llama", device="cpu")
    reached = []
    model.blocks[1].hook_resid_pre.add_hook(lambda act, hook: reached.append(hook.name))
    try:
        acts = collect(model, IDS, "resid_post", layers=0, progress=False)
        assert not reached and acts.hook_names == ["blocks.0.hook_resid_post"]
        collect(model, IDS, "resid_post", layers=1, progress=False)
        assert reached
    finally:
        model.reset_hooks()


def test_chunks_on_disk_resume_after_an_interruption(tmp_path, monkeypatch):
    model = models.load("tiny-llama", device="cpu")
    expected = collect(model, IDS, "resid_post", batch_size=2, progress=False)
    real_run_chunk = collect_module._run_chunk
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run dies while computing the second chunk
        return real_run_chunk(*args, **kwargs)

    monkeypatch.setattr(collect_module, "_run_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        collect(model, IDS, "resid_post", batch_size=2, out_dir=tmp_path, chunk_size=2, progress=False)
    index = json.loads((tmp_path / "index.json").read_text())
    assert not index["complete"] and [c["start"] for c in index["chunks"]] == [0]
    with pytest.raises(ValueError, match="incomplete"):
        Activations.load(tmp_path)

    calls.clear()
    monkeypatch.setattr(collect_module, "_run_chunk",
                        lambda *a, **k: (calls.append(1), real_run_chunk(*a, **k))[1])
    resumed = collect(model, IDS, "resid_post", batch_size=2, out_dir=tmp_path, chunk_size=2,
                      progress=False)
    assert len(calls) == 2  # chunks [2, 4) and [4, 5); chunk [0, 2) came from disk
    for name in expected.hook_names:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-5, rtol=0)
    assert resumed.n_tokens.tolist() == [len(x) for x in IDS]

    calls.clear()  # complete: a third call reads everything back
    again = collect(model, IDS, "resid_post", batch_size=2, out_dir=tmp_path, chunk_size=2, progress=False)
    assert not calls and torch.equal(again["blocks.1.hook_resid_post"], resumed["blocks.1.hook_resid_post"])
    lazy = Activations.load(tmp_path, in_memory=False)
    assert torch.equal(lazy["blocks.0.hook_resid_post"], resumed["blocks.0.hook_resid_post"])


def test_a_directory_of_other_inputs_or_weights_is_refused(tmp_path):
    model = models.load("tiny-llama", device="cpu")
    collect(model, IDS, "resid_post", out_dir=tmp_path, progress=False)
    with pytest.raises(ActivationsMismatchError, match="other inputs or settings"):
        collect(model, IDS[:3], "resid_post", out_dir=tmp_path, progress=False)
    with pytest.raises(ActivationsMismatchError):
        collect(models.load("tiny-llama", device="cpu", seed=3), IDS, "resid_post",
                out_dir=tmp_path, progress=False)
    with pytest.raises(ActivationsMismatchError):
        collect(model, IDS, "resid_post", pool="mean", out_dir=tmp_path, progress=False)


def test_save_load_round_trip_and_by_layer(tmp_path):
    model = models.load("tiny-gpt2", device="cpu")
    acts = collect(model, IDS, ["resid_post", "mlp_out"], progress=False)
    acts.save(tmp_path / "a", chunk_size=2)
    back = Activations.load(tmp_path / "a")
    assert back.hook_names == acts.hook_names and torch.equal(back.n_tokens, acts.n_tokens)
    for name in acts.hook_names:
        assert torch.equal(back[name], acts[name])
    by_layer = back.by_layer("resid_post")
    assert list(by_layer) == [0, 1] and torch.equal(by_layer[1], acts["blocks.1.hook_resid_post"])
    with pytest.raises(ValueError, match="several families"):
        back.by_layer()


def test_memory_budget_without_out_dir_is_refused():
    model = models.load("tiny-llama", device="cpu")
    with pytest.raises(ValueError, match="memory_gb.*out_dir"):
        collect(model, IDS, "resid_post", memory_gb=1e-7, progress=False)


@pytest.mark.unchecked
def test_errors_name_the_problem():
    model = models.load("tiny-llama", device="cpu")
    with pytest.raises(ValueError, match="no tokenizer"):
        collect(model, ["a string"], "resid_post", progress=False)
    with pytest.raises(ValueError, match="cannot pool attention patterns"):
        collect(model, IDS, "pattern", progress=False)
    with pytest.raises(ValueError, match="pool=9 is outside"):
        collect(model, IDS, "resid_post", pool=9, progress=False)
    with pytest.raises(ValueError, match="pool must be"):
        collect(model, IDS, "resid_post", pool="max", progress=False)
    with pytest.raises(ValueError, match="unknown hook family"):
        collect(model, IDS, "resid_postt", progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        collect(model, [[1, 2], []], "resid_post", progress=False)


def test_real_model_strings_padding_and_chat_template(default_model):
    """On SmolLM2: strings of different lengths batched together give the activations of each
    text run alone; the chat template wraps the text and ends at the assistant header."""
    model = default_model
    texts = ["The city of Paris is in France.", "Hi there",
             "A much longer sentence about the long history of the Roman empire and its fall."]
    names = ["blocks.0.hook_resid_post", "blocks.14.hook_resid_post", "blocks.29.hook_resid_post"]
    acts = collect(model, texts, names, layers=None, batch_size=3, progress=False)
    for i, text in enumerate(texts):
        tokens = model.to_tokens(text, prepend_bos=False)
        assert acts.n_tokens[i] == tokens.shape[1]
        _, cache = model.run_with_cache(tokens, names_filter=names)
        for name in names:
            ref = cache[name][0, -1]
            assert (acts[name][i] - ref).abs().max() <= 1e-5 * ref.norm() + 1e-4

    chat = collect(model, texts[:2], names[:1], layers=None, chat_template=True,
                   system_prompt="Answer briefly.", progress=False)
    wrapped = model.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": texts[0]}],
        tokenize=False, add_generation_prompt=True)
    assert wrapped.endswith("assistant\n")
    tokens = model.to_tokens(wrapped, prepend_bos=False)
    assert chat.n_tokens[0] == tokens.shape[1]
    _, cache = model.run_with_cache(tokens, names_filter=names[:1])
    torch.testing.assert_close(chat[names[0]][0], cache[names[0]][0, -1], atol=1e-4, rtol=1e-5)
