"""Batched exact patching against TransformerLens's own `patching.py`."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformer_lens import patching as tl_patching

from interp import models
from interp.attribution.metrics import LogitDiff, final_columns
from interp.attribution.patching import StaleCheckpointError, exact_patching

TL_FUNCTIONS = {
    "resid": tl_patching.get_act_patch_resid_pre,
    "attn": tl_patching.get_act_patch_attn_out,
    "mlp": tl_patching.get_act_patch_mlp_out,
    "heads": tl_patching.get_act_patch_attn_head_out_all_pos,
    "heads_by_pos": tl_patching.get_act_patch_attn_head_out_by_pos,
}


def _tiny_pairs(model, batch=3, pos=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)  # one token differs
    corrupt[:, 4] = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    answer = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    wrong = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    metric = LogitDiff(answer, wrong).normalised(model, clean, corrupt)
    return clean, corrupt, metric


def _compare_with_tl(model, clean, corrupt, metric, fams, direction="denoise", memory_gb=2.0,
                     call_cost=64.0):
    ours = exact_patching(model, clean, corrupt, metric, fams, direction=direction,
                          memory_gb=memory_gb, progress=False, call_cost=call_cost)
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    _, source_cache = model.run_with_cache(source)
    for fam in fams:
        theirs = TL_FUNCTIONS[fam](model, target, source_cache, lambda logits: metric(logits).mean())
        mine = ours[fam].values + ours[fam].baseline
        assert mine.shape == theirs.shape, fam
        diff = (mine - theirs.cpu()).abs().max().item()
        assert diff <= 1e-4, f"{fam} {direction}: max |diff| {diff}"
    return ours


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("call_cost", [64.0, 0.0], ids=["grouped", "one-position-per-chunk"])
def test_equals_transformer_lens_patching_on_tiny_models(name, direction, call_cost):
    """call_cost 0 makes every position its own chunk, so every chunk but the first runs from
    a KV cache of the target's earlier positions."""
    model = models.load(name)
    clean, corrupt, metric = _tiny_pairs(model)
    ours = _compare_with_tl(model, clean, corrupt, metric, list(TL_FUNCTIONS), direction,
                            call_cost=call_cost)
    # the sites matter: some effects are far from zero
    assert ours["resid"].values.abs().max() > 0.1


def test_chunking_does_not_change_results():
    model = models.load("tiny-llama")
    clean, corrupt, metric = _tiny_pairs(model)
    big = exact_patching(model, clean, corrupt, metric, ["resid", "heads"], progress=False)
    small = exact_patching(model, clean, corrupt, metric, ["resid", "heads"], memory_gb=1e-9,
                           progress=False)  # one site per chunk
    for fam in big:
        assert torch.allclose(big[fam].values, small[fam].values, atol=1e-5)


def test_skip_prefix_off_runs_every_position_with_the_same_results(monkeypatch):
    from interp.attribution import patching

    model = models.load("tiny-llama")
    clean, corrupt, metric = _tiny_pairs(model)  # first difference at position 2
    fams = ["resid", "heads"]
    real, starts = patching._run_wave, []
    monkeypatch.setattr(patching, "_run_wave", lambda *a, **k: starts.append(a[7]) or real(*a, **k))
    fast = exact_patching(model, clean, corrupt, metric, fams, progress=False, call_cost=0.0)
    assert min(starts) == 2 and max(starts) > 2
    starts.clear()
    full = exact_patching(model, clean, corrupt, metric, fams, progress=False, call_cost=0.0,
                          skip_prefix=False)
    assert set(starts) == {0}
    for fam in fams:
        torch.testing.assert_close(full[fam].values, fast[fam].values, atol=1e-5, rtol=0)


def test_right_padded_prompts_of_different_lengths_equal_separate_runs():
    """A batch of a 7-token and a 5-token prompt (right-padded, `end_pos` set) scores each site
    as the mean of the two prompts patched separately; pad positions of the short prompt add 0."""
    model = models.load("tiny-llama")
    clean, corrupt, metric = _tiny_pairs(model, batch=2)
    metric = LogitDiff(metric.answer_ids, metric.wrong_ids, clean=2.0, corrupt=-1.0,
                       end_pos=torch.tensor([6, 4]))
    clean[1, 5:], corrupt[1, 5:] = 0, 0  # padding after the short prompt's end
    fams = ["resid", "mlp", "heads_by_pos", "heads"]
    both = exact_patching(model, clean, corrupt, metric, fams, progress=False, call_cost=0.0)
    one = exact_patching(model, clean[:1], corrupt[:1], metric.select([0]), fams, progress=False)
    two = exact_patching(model, clean[1:, :5], corrupt[1:, :5],
                         replace(metric.select([1]), end_pos=None), fams, progress=False)
    for fam in fams:
        short = two[fam].values
        if "pos" in two[fam].dims:  # the short prompt has no sites at positions 5 and 6
            pad = [0, 0] * (short.ndim - 2) + [0, 2]
            short = torch.nn.functional.pad(short, pad)
        expected = (one[fam].values + short) / 2
        assert torch.allclose(both[fam].values, expected, atol=1e-5), fam
    assert both["resid"].values.abs().max() > 0.05


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_everything_at_layer_0_gives_the_source_run(direction, last_logit_diff):
    """Clean and corrupt differ at position 2 only, so the residual stream entering layer 0 (the
    embeddings) differs there only: patching resid_pre at layer 0, position 2 patches it at every
    position, and the patched run is the source run. Its score must be metric(source) -
    metric(target), both from plain forward passes (raw logit difference: the expected value is
    not 1 by normalisation)."""
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = _tiny_pairs(model)
    corrupt[:, 4] = clean[:, 4]
    raw = LogitDiff(metric.answer_ids, metric.wrong_ids)
    ours = exact_patching(model, clean, corrupt, raw, ["resid"], direction=direction, progress=False)
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    name = "blocks.0.hook_resid_pre"
    with torch.no_grad():
        source_logits, source_cache = model.run_with_cache(source, names_filter=name)
        target_logits, target_cache = model.run_with_cache(target, names_filter=name)
    same = [p for p in range(clean.shape[1]) if p != 2]
    assert torch.equal(source_cache[name][:, same], target_cache[name][:, same])
    target_metric = last_logit_diff(target_logits, raw)
    expected = (last_logit_diff(source_logits, raw) - target_metric).mean().item()
    assert abs(expected) > 1e-2  # the corruption matters (rounding is ~1e-6)
    assert ours["resid"].baseline == pytest.approx(target_metric.mean().item(), abs=1e-5)
    assert ours["resid"].values[0, 2].item() == pytest.approx(expected, abs=1e-5)
    # patching a position whose embedding is the same in both runs changes nothing
    assert ours["resid"].values[0, same].abs().max() < 1e-5


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_neurons_equal_transformer_lens_generic_patching(name, direction):
    """MLP neurons (`mlp.hook_post`, all positions; 24 random ones per layer, as TL runs one
    forward pass per neuron) against TransformerLens's `generic_activation_patch`: its
    `layer_head_vector_patch_setter` patches `act[:, :, index]`, which for `post`
    (batch pos d_mlp) is one neuron at every position."""
    import pandas as pd

    model = models.load(name)
    clean, corrupt, metric = _tiny_pairs(model)
    ours = exact_patching(model, clean, corrupt, metric, ["neurons"], direction=direction,
                          progress=False)["neurons"]
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    _, source_cache = model.run_with_cache(source)
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    gen = torch.Generator().manual_seed(1)
    sites = torch.tensor([(layer, int(n)) for layer in range(n_layers)
                          for n in torch.randperm(d_mlp, generator=gen)[:24]])
    index = pd.DataFrame(sites.tolist(), columns=["layer", "head"])
    theirs = tl_patching.generic_activation_patch(
        model, target, source_cache, lambda logits: metric(logits).mean(),
        tl_patching.layer_head_vector_patch_setter, "post", index_df=index)
    assert ours.values.shape == (n_layers, d_mlp)
    mine = ours.values[sites[:, 0], sites[:, 1]] + ours.baseline
    diff = (mine - theirs.cpu()).abs().max().item()
    assert diff <= 1e-4, f"neurons {direction}: max |diff| {diff}"
    assert (mine - ours.baseline).abs().max() > 1e-2  # not a comparison of zeros


def test_final_columns_equal_full_logits():
    model = models.load("tiny-llama")
    tokens = torch.randint(0, 256, (4, 9))
    cols = torch.randint(0, 256, (4, 3))
    with torch.no_grad():
        full = model(tokens)[:, -1].gather(-1, cols)
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        assert torch.allclose(final_columns(model, resid[:, -1], cols), full, atol=1e-5)


def test_default_model_subset_matches_transformer_lens(default_model):
    """On SmolLM2 and one IOI pair, a spread of head and MLP-by-position sites equals TL's
    `generic_activation_patch` on the same sites (TL runs one full forward per site)."""
    import pandas as pd

    model = default_model
    clean = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupt = model.to_tokens("When Alice and Bob went to the store, Charlie gave a drink to")
    assert clean.shape == corrupt.shape
    metric = LogitDiff(torch.tensor([model.to_single_token(" Mary")]),
                       torch.tensor([model.to_single_token(" John")])).normalised(model, clean, corrupt)
    ours = exact_patching(model, clean, corrupt, metric, ["heads", "mlp"], progress=False)
    _, clean_cache = model.run_with_cache(clean)
    tl_metric = lambda logits: metric(logits).mean()  # noqa: E731
    layers = [0, 7, 15, 22, 29]
    heads = pd.DataFrame([(layer, h) for layer in layers for h in (0, 4, 8)], columns=["layer", "head"])
    theirs = tl_patching.generic_activation_patch(
        model, corrupt, clean_cache, tl_metric, tl_patching.layer_head_vector_patch_setter, "z",
        index_df=heads)
    mine = ours["heads"].values[heads["layer"].values, heads["head"].values] + ours["heads"].baseline
    assert (mine - theirs).abs().max() <= 1e-4
    mlp = pd.DataFrame([(layer, p) for layer in layers for p in (1, 3, 9, clean.shape[1] - 1)],
                       columns=["layer", "pos"])
    theirs = tl_patching.generic_activation_patch(
        model, corrupt, clean_cache, tl_metric, tl_patching.layer_pos_patch_setter, "mlp_out",
        index_df=mlp)
    mine = ours["mlp"].values[mlp["layer"].values, mlp["pos"].values] + ours["mlp"].baseline
    assert (mine - theirs).abs().max() <= 1e-4
    assert ours["mlp"].values.abs().max() > 0.05  # the comparison is not between zeros


@pytest.mark.unchecked
def test_bad_shapes_are_named():
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = _tiny_pairs(model)
    with pytest.raises(ValueError, match=r"clean \(3, 7\) and corrupt \(3, 6\)"):
        exact_patching(model, clean, corrupt[:, :6], metric, progress=False)
    with pytest.raises(ValueError, match="answers for 3 prompts but the batch has 2"):
        exact_patching(model, clean[:2], corrupt[:2], metric, progress=False)
    with pytest.raises(ValueError, match="Unknown site family 'heds'"):
        exact_patching(model, clean, corrupt, metric, ["heds"], progress=False)
    with pytest.raises(ValueError, match="direction must be"):
        exact_patching(model, clean, corrupt, metric, direction="sideways", progress=False)


def test_checkpoint_resumes_finished_sites(tmp_path):
    model = models.load("tiny-llama")
    clean, corrupt, metric = _tiny_pairs(model)
    full = exact_patching(model, clean, corrupt, metric, ["resid"], progress=False,
                          checkpoint=tmp_path / "a")
    saved = torch.load(tmp_path / "a" / "resid.pt")
    assert saved["done"].all()
    # An interrupted run that finished layer 0 only (marked by a sentinel): the rerun keeps
    # layer 0 as saved and computes the rest.
    partial = torch.zeros_like(saved["values"])
    partial[0] = 123.0
    done = torch.zeros_like(saved["done"])
    done[0] = True
    (tmp_path / "b").mkdir()
    torch.save({**saved, "values": partial, "done": done}, tmp_path / "b" / "resid.pt")
    resumed = exact_patching(model, clean, corrupt, metric, ["resid"], progress=False,
                             checkpoint=tmp_path / "b", memory_gb=1e-9)  # batching may change
    assert (resumed["resid"].values[0] == 123.0).all()
    torch.testing.assert_close(resumed["resid"].values[1:], full["resid"].values[1:])
    # a file without a fingerprint (older checkpoints) is refused, not trusted
    (tmp_path / "c").mkdir()
    torch.save({"values": partial, "done": done}, tmp_path / "c" / "resid.pt")
    with pytest.raises(StaleCheckpointError, match=r"no fingerprint.*Delete .*resid\.pt"):
        exact_patching(model, clean, corrupt, metric, ["resid"], progress=False,
                       checkpoint=tmp_path / "c")


def test_a_checkpoint_made_with_other_settings_is_refused(tmp_path, monkeypatch):
    """Other tokens, direction, metric, weights or site family: refused, naming the field."""
    from interp.attribution import patching
    from interp.attribution.sites import SiteFamily

    model = models.load("tiny-llama")
    clean, corrupt, metric = _tiny_pairs(model)
    fams = ["resid", "heads"]
    first = exact_patching(model, clean, corrupt, metric, fams, progress=False, checkpoint=tmp_path)
    other_tokens = corrupt.clone()
    other_tokens[:, 5] = (other_tokens[:, 5] + 1) % model.cfg.d_vocab
    other_model = models.load("tiny-llama")
    with torch.no_grad():
        other_model.blocks[1].mlp.W_out[0, 0] += 1e-3
    other_resid = SiteFamily("resid", "blocks.{L}.hook_resid_mid", ("pos",),
                             ("batch", "pos", "d_model"))
    cases = {
        "corrupt_tokens": {"corrupt_tokens": other_tokens},
        "direction": {"direction": "noise"},
        "metric": {"metric": replace(metric, clean=metric.clean + 0.5)},
        "weights": {"model": other_model},
        "family": {"site_families": [other_resid]},
    }
    base = {"model": model, "clean_tokens": clean, "corrupt_tokens": corrupt, "metric": metric,
            "site_families": fams}
    for field, change in cases.items():
        with pytest.raises(StaleCheckpointError,
                           match=rf"other settings \({field} differ.*Delete .*resid\.pt"):
            exact_patching(**{**base, **change}, progress=False, checkpoint=tmp_path)
    wrong_ids = replace(metric, wrong_ids=(metric.wrong_ids + 1) % model.cfg.d_vocab)
    with pytest.raises(StaleCheckpointError, match=r"\(metric differ"):
        exact_patching(**{**base, "metric": wrong_ids}, progress=False, checkpoint=tmp_path)
    # the same settings resume: nothing is recomputed, the values are the saved ones
    monkeypatch.setattr(patching, "_run_wave", lambda *a, **k: pytest.fail("recomputed"))
    again = exact_patching(**base, progress=False, checkpoint=tmp_path, call_cost=0.0)
    for fam in fams:
        assert torch.equal(again[fam].values, first[fam].values)


def test_an_interrupted_run_loses_nothing_already_computed(tmp_path, monkeypatch):
    """Interrupt the third wave of patched runs; the rerun runs only the waves not saved."""
    from interp.attribution import patching

    model = models.load("tiny-llama")
    clean, corrupt, metric = _tiny_pairs(model)
    real, calls, stop_at = patching._run_wave, [], [3]

    class Interrupted(Exception):
        pass

    def counted(*args, **kwargs):
        calls.append(args[4])  # the wave's layers
        if len(calls) == stop_at[0]:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(patching, "_run_wave", counted)

    def run(**kw):
        calls.clear()
        return exact_patching(model, clean, corrupt, metric, ["resid"], progress=False,
                              call_cost=0.0, **kw)  # call_cost 0: a chunk per position, many waves

    with pytest.raises(Interrupted):
        run(checkpoint=tmp_path)
    stop_at[0] = -1
    resumed = run(checkpoint=tmp_path)
    n_resumed = len(calls)
    full = run()
    assert len(calls) > 3 and n_resumed == len(calls) - 2
    torch.testing.assert_close(resumed["resid"].values, full["resid"].values)
