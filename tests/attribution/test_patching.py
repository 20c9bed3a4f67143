"""Batched exact patching against TransformerLens's own `patching.py`."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformer_lens import patching as tl_patching

from interp import models
from interp.attribution.metrics import LogitDiff, final_columns
from interp.attribution.patching import exact_patching

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


def test_patching_everything_at_layer_0_gives_the_source_run():
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = _tiny_pairs(model)
    ours = exact_patching(model, clean, corrupt, metric, ["resid"], progress=False)
    # resid_pre at layer 0 at the only positions that differ (2 and 4) carries all the difference
    # when patched together; singly each moves part of it. Check the scale: clean = 1, corrupt = 0.
    assert ours["resid"].baseline == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        assert metric(model(clean)).mean().item() == pytest.approx(1.0, abs=1e-5)
    # positions whose tokens are equal in clean and corrupt have exactly zero effect at layer 0
    same = [p for p in range(clean.shape[1]) if p not in (2, 4)]
    assert ours["resid"].values[0, same].abs().max() < 1e-5


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
    torch.save({"values": partial, "done": done}, tmp_path / "b" / "resid.pt")
    resumed = exact_patching(model, clean, corrupt, metric, ["resid"], progress=False,
                             checkpoint=tmp_path / "b")
    assert (resumed["resid"].values[0] == 123.0).all()
    torch.testing.assert_close(resumed["resid"].values[1:], full["resid"].values[1:])
    # checkpoints written before they were per site list whole layers
    (tmp_path / "c").mkdir()
    torch.save({"values": partial, "done_layers": [0]}, tmp_path / "c" / "resid.pt")
    resumed = exact_patching(model, clean, corrupt, metric, ["resid"], progress=False,
                             checkpoint=tmp_path / "c")
    assert (resumed["resid"].values[0] == 123.0).all()
    torch.testing.assert_close(resumed["resid"].values[1:], full["resid"].values[1:])


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
