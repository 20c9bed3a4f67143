"""Tests for interp.judges.refusal: the substring judge on hand examples, agreement statistics
on hand-made verdicts (computed by hand here), and the refusal score on a tiny model with a
planted refusal token, checked against a plain forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from interp import hooks
from interp.judges import refusal as J
from interp.judges.base import Judge, JudgeResult, wilson_interval
from interp.models import load

REFUSE = 200


@pytest.mark.parametrize("text,refused", [
    ("I'm sorry, but I can't help with that.", True),
    ("i cannot do that", True),
    ("I can\u2019t assist with this request.", True),  # typographic apostrophe
    ("As an AI, I don't have opinions.", True),
    ("Sure! Here is a recipe for bread.", False),
    # documented failure modes: a refusal without a listed phrase is missed ...
    ("Sorry, but no. That is not something I will help with.", False),
    # ... and compliant text that contains a phrase counts as a refusal
    ("I can't stress enough how easy this is: first, preheat the oven.", True),
])
def test_substring_judge_on_hand_examples(text, refused):
    assert J.is_refusal(text) is refused
    assert J.SubstringRefusalJudge()([text]).items[0]["refused"] is refused


def test_matched_phrases_and_custom_phrases():
    assert J.matched_phrases("I'm sorry. I cannot.") == ["I'm sorry", "I cannot"]
    assert J.is_refusal("Nope.", phrases=["nope"])
    with pytest.raises(ValueError, match="non-empty"):
        J.SubstringRefusalJudge([])
    assert isinstance(J.SubstringRefusalJudge(), Judge)


def test_concepts_refusal_reexports_the_judges_phrases():
    from interp.concepts import refusal as concepts_refusal

    assert concepts_refusal.REFUSAL_PHRASES is J.REFUSAL_PHRASES
    assert concepts_refusal.is_refusal is J.is_refusal


def test_substring_judge_result_and_saved_inputs(tmp_path):
    completions = ["I cannot help.", "Sure, here it is.", "I'm unable to do that."]
    prompts = ["p0", "p1", "p2"]
    res = J.SubstringRefusalJudge()(completions, prompts)
    assert (res.rates["refused"].k, res.rates["refused"].n) == (2, 3)
    assert res.rate == pytest.approx(2 / 3) and res.ci95 == pytest.approx(wilson_interval(2, 3))
    assert res.verdicts() == [True, False, True]
    res.save(tmp_path / "refusal.jsonl")
    again = JudgeResult.load(tmp_path / "refusal")
    assert [(it["prompt"], it["completion"], it["refused"]) for it in again.items] == list(
        zip(prompts, completions, [True, False, True]))
    assert again.rates == res.rates


def test_agreement_on_hand_made_verdicts():
    verdicts = [True, True, False, False, True, False]
    scores = [2.0, -1.0, -3.0, 0.5, 1.5, -0.2]
    out = J.refusal_agreement(verdicts, scores, threshold=0.0)
    # by score: T F F T T F -> agrees on items 0, 2, 4, 5
    assert (out["agreement"].k, out["agreement"].n) == (4, 6)
    # kappa = (p_o - p_e) / (1 - p_e), p_o = 4/6, p_e = 0.5 * 0.5 + 0.5 * 0.5
    assert out["cohen_kappa"] == pytest.approx((4 / 6 - 0.5) / 0.5)
    # AUC: share of (refusal, compliance) pairs where the refusal scores higher: 3 + 1 + 3 of 9
    assert out["roc_auc"] == pytest.approx(7 / 9)
    # a higher threshold changes the score verdicts (T F F F T F: 5 of 6 agree), not the AUC
    out2 = J.refusal_agreement(verdicts, scores, threshold=1.0)
    assert out2["agreement"].k == 5 and out2["roc_auc"] == pytest.approx(7 / 9)


def test_agreement_skips_missing_verdicts_and_reports_undefined_as_none():
    out = J.refusal_agreement([True, None, True], [1.0, 5.0, float("nan")])
    assert out["n"] == 1 and out["agreement"].k == 1
    assert out["cohen_kappa"] is None and out["roc_auc"] is None  # one class only
    empty = J.refusal_agreement([], [])
    assert empty["n"] == 0 and math.isnan(empty["agreement"].rate)


def test_judge_refusal_with_precomputed_scores(tmp_path):
    completions = ["I'm sorry, I can't.", "Sure!", "As an AI, no.", "Here you go."]
    res = J.judge_refusal(completions, [3.0, -2.0, -0.5, 1.0], prompt_texts=list("abcd"))
    assert [it["refused"] for it in res.items] == [True, False, True, False]
    assert [it["refused_by_score"] for it in res.items] == [True, False, False, True]
    assert res.rates["agreement"].k == 2
    # refusals score 3 and -0.5, compliances -2 and 1: 3 of the 4 pairs are ordered right
    assert res.stats["roc_auc"] == pytest.approx(3 / 4)
    items_path, summary_path = res.save(tmp_path / "r")
    assert items_path.exists() and summary_path.exists()
    with pytest.raises(ValueError, match="scores"):
        J.judge_refusal(completions)
    with pytest.raises(ValueError, match="4 completions but 3 scores"):
        J.judge_refusal(completions, [0.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def planted():
    """tiny-llama whose unembedding column of REFUSE is doubled, and a steering hook along it
    that makes REFUSE the likely next token."""
    model = load("tiny-llama")
    with torch.no_grad():
        model.unembed.W_U[:, REFUSE] *= 2.0
    v = model.unembed.W_U[:, REFUSE].detach().clone()
    return model, v / v.norm()


def _independent_score(model, prompt, add=None):
    """log(p / (1 - p)) of REFUSE after one unpadded prompt, plain TransformerLens hooks."""
    fwd = [] if add is None else [("blocks.1.hook_resid_pre", lambda act, hook: act + add)]
    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([prompt]), fwd_hooks=fwd)[0, -1]
    p = logits.double().softmax(-1)[REFUSE]
    return float(torch.log(p / (1 - p)))


def test_judge_refusal_computes_scores_under_hooks(planted):
    model, v = planted
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 200, (int(n),), generator=g).tolist() for n in (5, 7, 6, 4)]
    steer = hooks.steer(model, v, layers=[1], scale=50.0)
    refusing = ["I cannot do that.", "I'm sorry.", "I can't.", "As an AI, no."]
    complying = ["Sure.", "Here it is.", "Of course!", "Yes: 4."]
    clean = J.judge_refusal(complying, model=model, prompts=prompts, refusal_tokens=[REFUSE])
    steered = J.judge_refusal(refusing, model=model, prompts=prompts, refusal_tokens=[REFUSE],
                              hooks=steer)
    want_clean = [_independent_score(model, p) for p in prompts]
    want_steered = [_independent_score(model, p, 50.0 * v) for p in prompts]
    assert [it["refusal_score"] for it in clean.items] == pytest.approx(want_clean, abs=1e-3)
    assert [it["refusal_score"] for it in steered.items] == pytest.approx(want_steered, abs=1e-3)
    assert max(want_clean) < 0 < min(want_steered)  # the planted token works as built
    # the two halves together: both judges agree on every item
    both = J.judge_refusal(complying + refusing, want_clean + want_steered)
    assert both.rates["agreement"].k == 8
    assert both.stats["cohen_kappa"] == pytest.approx(1.0)
    assert both.stats["roc_auc"] == pytest.approx(1.0)
    # a model without tokenizer: prompts are saved as their ids
    assert clean.items[0]["prompt"] == " ".join(map(str, prompts[0]))
    assert clean.config["refusal_token_ids"] == [REFUSE]
