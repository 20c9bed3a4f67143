"""`batch_size` for AtP, RelP and IG: prompts in chunks give the unchunked scores, and
per-prompt AtP gives each prompt's own scores.

Tolerances: the metric is a logit difference normalised by (clean - corrupt), which amplifies the
float rounding of other batch shapes to ~1e-5 relative (one torch thread; two threads round
differently)."""

from __future__ import annotations

import pytest
import torch

from interp import models
from interp.attribution import (
    CallableMetric,
    KLToClean,
    LogitDiff,
    attribution_patching,
    integrated_gradients,
    relp,
)

FAMS = ["resid", "attn", "mlp", "heads", "heads_by_pos", "neurons"]

METHODS = {
    "atp": lambda m, c, x, metric, **kw: attribution_patching(m, c, x, metric, FAMS, **kw),
    "relp": lambda m, c, x, metric, **kw: relp(m, c, x, metric, FAMS, **kw),
    "ig_inputs": lambda m, c, x, metric, **kw: integrated_gradients(m, c, x, metric, FAMS, steps=3, **kw),
    "ig_activations": lambda m, c, x, metric, **kw: integrated_gradients(
        m, c, x, metric, FAMS, steps=2, path="activations", **kw),
}


def padded_pairs(model, seed=0):
    """5 prompts of lengths 7, 4, 6, 7, 5, right-padded; a normalised logit difference read at
    each prompt's end (chunks then mix lengths and cut the normalisation's batch)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 6, 7, 5])
    clean = torch.randint(0, model.cfg.d_vocab, (5, 7), generator=gen)
    corrupt = torch.randint(0, model.cfg.d_vocab, (5, 7), generator=gen)
    pad = torch.arange(7)[None, :] >= lengths[:, None]
    clean[pad], corrupt[pad] = 0, 0
    answer = torch.randint(0, model.cfg.d_vocab, (5,), generator=gen)
    metric = LogitDiff(answer, (answer + 3) % model.cfg.d_vocab, end_pos=lengths - 1)
    return clean, corrupt, metric.normalised(model, clean, corrupt)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunks_of_one_and_two_equal_the_whole_batch(method):
    model = models.load("tiny-llama")
    clean, corrupt, metric = padded_pairs(model)
    run = METHODS[method]
    whole = run(model, clean, corrupt, metric)
    for batch_size in (1, 2, 5, 100):
        chunked = run(model, clean, corrupt, metric, batch_size=batch_size)
        for fam in FAMS:
            assert whole[fam].values.abs().max() > 1e-2, fam
            torch.testing.assert_close(chunked[fam].values, whole[fam].values, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, fam=fam, bs=batch_size: f"{method} {fam} bs={bs}: {m}")
            # the baseline is a normalised logit difference near 0 (the corrupt end): its
            # division by (clean - corrupt) amplifies the float rounding of other batch shapes
            # (measured up to 9e-6 with one torch thread)
            assert chunked[fam].baseline == pytest.approx(whole[fam].baseline, abs=5e-5)
            assert chunked[fam].labels == whole[fam].labels


def test_chunks_with_a_full_vocabulary_metric():
    """KLToClean holds per-prompt clean log-probabilities: chunks must take their own rows.
    (Denoising: on the clean run, the target of "noise", KL is at its minimum and its gradient 0.)"""
    model = models.load("tiny-llama")
    clean, corrupt, _ = padded_pairs(model)
    metric = KLToClean.from_model(model, clean, end_pos=torch.tensor([6, 3, 5, 6, 4]))
    whole = attribution_patching(model, clean, corrupt, metric, ["resid", "heads"])
    chunked = attribution_patching(model, clean, corrupt, metric, ["resid", "heads"], batch_size=2)
    for fam in ("resid", "heads"):
        assert whole[fam].values.abs().max() > 1e-3
        torch.testing.assert_close(chunked[fam].values, whole[fam].values, atol=1e-4, rtol=1e-4)


def test_per_prompt_atp_is_each_prompt_alone():
    """Prompt b's row is AtP on prompt b alone (unpadded, its row of the metric); the mean over
    the prompt axis is the batch score; chunking does not change it."""
    model = models.load("tiny-llama")
    clean, corrupt, metric = padded_pairs(model)
    lengths = metric.end_pos + 1
    fams = ["resid", "heads", "neurons"]
    whole = attribution_patching(model, clean, corrupt, metric, fams)
    per = attribution_patching(model, clean, corrupt, metric, fams, per_prompt=True)
    per_chunked = attribution_patching(model, clean, corrupt, metric, fams, per_prompt=True, batch_size=2)
    for fam in fams:
        s = per[fam]
        assert s.dims == ("layer", "prompt", *whole[fam].dims[1:])
        assert s.labels["prompt"] == ["0", "1", "2", "3", "4"]
        torch.testing.assert_close(s.values.mean(1), whole[fam].values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(per_chunked[fam].values, s.values, atol=1e-4, rtol=1e-4)
        for b in range(5):
            n = int(lengths[b])
            alone = attribution_patching(model, clean[b:b + 1, :n], corrupt[b:b + 1, :n],
                                         metric.select([b]), [fam])[fam].values
            mine = s.values[:, b, :n] if fam == "resid" else s.values[:, b]
            # unpadded vs padded rows: other shapes, other float rounding, amplified by the
            # normalisation (measured up to 6e-5 absolute with one torch thread)
            torch.testing.assert_close(mine, alone, atol=2e-4, rtol=1e-3)
            if fam == "resid":  # padding positions never reach the prediction
                assert torch.all(s.values[:, b, n:] == 0)


def test_bad_batch_sizes_and_unselectable_metrics():
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = padded_pairs(model)
    with pytest.raises(ValueError, match="batch_size must be a positive number"):
        attribution_patching(model, clean, corrupt, metric, ["resid"], batch_size=0)
    fn = CallableMetric(lambda logits: logits[:, -1, 0] - logits[:, -1, 1])
    with pytest.raises(ValueError, match="batch_size=2 runs the 5 prompts in chunks"):
        integrated_gradients(model, clean, corrupt, fn, ["resid"], batch_size=2)
    # a plain function works unchunked, and with one chunk holding every prompt
    assert torch.equal(attribution_patching(model, clean, corrupt, fn, ["resid"], batch_size=5)["resid"].values,
                       attribution_patching(model, clean, corrupt, fn, ["resid"])["resid"].values)
