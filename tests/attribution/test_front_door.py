"""The front door `attribute(...)`: the same numbers as each method's own function, bad input
refused, and position sites of mixed-template pairs reported by slot (against a prompt-by-prompt
hand aggregation)."""

from __future__ import annotations

import pytest
import torch

from interp import models
from interp.attribution import (
    METHODS,
    CallableMetric,
    LogitDiff,
    LRPRules,
    atp_star,
    attribute,
    attribution_patching,
    by_slot,
    exact_patching,
    integrated_gradients,
    relp,
)
from interp.tasks import PromptPairs, generate_ioi

FAMS = ["resid", "attn", "mlp", "heads"]

#: method name -> (the method's own call, the options both calls get)
DIRECT = {
    "exact": (lambda m, c, x, metric, fams, **kw: exact_patching(m, c, x, metric, fams, **kw),
              {"progress": False}),
    "atp": (lambda m, c, x, metric, fams, **kw: attribution_patching(m, c, x, metric, fams, **kw),
            {"direction": "noise"}),
    "atp_star": (lambda m, c, x, metric, fams, **kw: atp_star(m, c, x, metric, fams, **kw), {}),
    "ig_inputs": (lambda m, c, x, metric, fams, **kw: integrated_gradients(m, c, x, metric, fams, **kw),
                  {"steps": 3}),
    "ig_activations": (lambda m, c, x, metric, fams, **kw: integrated_gradients(
        m, c, x, metric, fams, path="activations", **kw), {"steps": 2}),
    "relp": (lambda m, c, x, metric, fams, **kw: relp(m, c, x, metric, fams, **kw),
             {"rules": LRPRules(ln=True, identity=False, half=True)}),
}


def test_every_method_has_a_direct_check():
    assert set(DIRECT) == set(METHODS)


@pytest.mark.parametrize("method", sorted(DIRECT))
def test_attribute_equals_the_method_function(method, random_pairs):
    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    call, options = DIRECT[method]
    direct = call(model, clean, corrupt, metric, FAMS, **options)
    front = attribute(model, (clean, corrupt), metric, FAMS, method=method, **options)
    assert list(front) == FAMS
    for fam in FAMS:
        assert front[fam].values.abs().max() > 1e-3, fam  # not a comparison of zeros
        assert torch.equal(front[fam].values, direct[fam].values), (method, fam)
        assert front[fam].dims == direct[fam].dims and front[fam].labels == direct[fam].labels
        assert front[fam].baseline == direct[fam].baseline
        assert front[fam].method == method


def test_attribute_records_a_given_name_and_graddrop(random_pairs):
    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    named = attribute(model, (clean, corrupt), metric, ["heads"], method="exact", name="truth",
                      progress=False)
    assert named["heads"].method == "truth"
    drop = attribute(model, (clean, corrupt), metric, ["heads"], method="atp_star", grad_drop=True)
    assert drop["heads"].method == "atp_star_graddrop" and not drop["heads"].signed
    direct = atp_star(model, clean, corrupt, metric, ["heads"], grad_drop=True)
    assert torch.equal(drop["heads"].values, direct["heads"].values)


def test_bad_method_and_options_are_refused(random_pairs):
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = random_pairs(model)
    with pytest.raises(ValueError, match="unknown method 'atp\\*'.*exact, atp, atp_star, ig_inputs, "
                                         "ig_activations, relp"):
        attribute(model, (clean, corrupt), metric, method="atp*")
    with pytest.raises(ValueError, match="takes no option 'stpes'.*steps"):
        attribute(model, (clean, corrupt), metric, method="ig_inputs", stpes=3)
    with pytest.raises(ValueError, match="fixes path"):
        attribute(model, (clean, corrupt), metric, method="ig_inputs", path="activations")
    with pytest.raises(ValueError, match="own arguments"):
        attribute(model, (clean, corrupt), metric, site_families=["resid"])
    with pytest.raises(ValueError, match="needs a metric"):
        attribute(model, (clean, corrupt))
    with pytest.raises(ValueError, match="slots=True needs PromptPairs"):
        attribute(model, (clean, corrupt), metric, slots=True)
    with pytest.raises(ValueError, match="answers for 3 prompts but the batch has 2"):
        attribute(model, (clean[:2], corrupt[:2]), metric)


@pytest.mark.unchecked
def test_bad_metric_and_inputs_are_refused(random_pairs):
    model = models.load("tiny-gpt2")
    clean, corrupt, metric = random_pairs(model)
    with pytest.raises(ValueError, match="metric must be a Metric"):
        attribute(model, (clean, corrupt), 42)
    with pytest.raises(ValueError, match="PromptPairs .* or a \\(clean_tokens, corrupt_tokens\\)"):
        attribute(model, clean, metric)


# ----------------------------------------------------------------------------------------------
# Pairs and slots
# ----------------------------------------------------------------------------------------------

#: Two made-up templates: (length, {slot: position}); rows alternate between them.
TEMPLATES = [(7, {"IO": 1, "S1": 3, "S2": 5}), (9, {"IO": 4, "S1": 2, "S2": 6})]


def fake_pairs(model, rows=(0, 1, 0, 1), seed=0) -> PromptPairs:
    """Right-padded random prompt pairs whose slots sit where their template puts them (tiny
    models have no tokenizer, so no generated IOI pairs)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(TEMPLATES[t][0] for t in rows)
    clean = torch.zeros(len(rows), width, dtype=torch.long)
    corrupt = torch.zeros(len(rows), width, dtype=torch.long)
    for i, t in enumerate(rows):
        n = TEMPLATES[t][0]
        clean[i, :n] = torch.randint(0, model.cfg.d_vocab, (n,), generator=gen)
        corrupt[i, :n] = torch.randint(0, model.cfg.d_vocab, (n,), generator=gen)
    end = torch.tensor([TEMPLATES[t][0] - 1 for t in rows])
    positions = {s: torch.tensor([TEMPLATES[t][1][s] for t in rows]) for s in ("IO", "S1", "S2")}
    positions["end"] = end.clone()
    answer = torch.randint(0, model.cfg.d_vocab, (len(rows),), generator=gen)
    return PromptPairs(clean, corrupt, answer, (answer + 1) % model.cfg.d_vocab, end,
                       [""] * len(rows), [""] * len(rows), torch.tensor(list(rows)),
                       ("t0", "t1"), positions)


def by_hand(per_prompt_pos: list[torch.Tensor], pairs: PromptPairs) -> torch.Tensor:
    """Slot scores `[layer, 5]` (IO, S1, S2, end, other summed) from each prompt's own position
    scores `[layer, pos_b]`, averaged over prompts: plain indexing, no weights."""
    out = []
    for b, values in enumerate(per_prompt_pos):
        slots = [int(pairs.positions[s][b]) for s in ("IO", "S1", "S2", "end")]
        rest = [p for p in range(int(pairs.end_pos[b]) + 1) if p not in slots]
        out.append(torch.stack([*(values[:, p] for p in slots), values[:, rest].sum(1)], dim=1))
    return torch.stack(out).mean(0)


def one_by_one(fn, model, pairs, metric, fams, **kw):
    """`fn` on each prompt alone (unpadded), on the batch's normalisation."""
    runs = []
    for b in range(len(pairs)):
        n = int(pairs.end_pos[b]) + 1
        runs.append(fn(model, pairs.clean_tokens[b:b + 1, :n], pairs.corrupt_tokens[b:b + 1, :n],
                       metric.select([b]), fams, **kw))
    return runs


@pytest.mark.parametrize("method", ["exact", "atp"])
def test_mixed_templates_are_reported_by_slot(method):
    """Exact patching and AtP on prompts of two templates: the front door's slot scores equal
    the slot scores of each prompt patched on its own, aggregated by hand; non-position
    families equal the mean of the prompts' own scores."""
    model = models.load("tiny-llama")
    pairs = fake_pairs(model, rows=(0, 1, 0, 0))  # groups of 3 and 1 prompts: weights matter
    metric = pairs.metric(model)
    fams = ["resid", "mlp", "heads"]
    kw = {"progress": False} if method == "exact" else {}
    fn = exact_patching if method == "exact" else attribution_patching
    front = attribute(model, pairs, sites=fams, method=method, **kw)
    alone = one_by_one(fn, model, pairs, metric, fams, **kw)
    for fam in ("resid", "mlp"):
        s = front[fam]
        assert s.dims == ("layer", "slot") and s.labels["slot"] == ["IO", "S1", "S2", "end", "other"]
        expected = by_hand([a[fam].values for a in alone], pairs)
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(s.values, expected, atol=1e-5, rtol=1e-5)
    heads = torch.stack([a["heads"].values for a in alone]).mean(0)
    torch.testing.assert_close(front["heads"].values, heads, atol=1e-5, rtol=1e-5)
    baseline = sum(a["heads"].baseline for a in alone) / len(alone)
    assert front["heads"].baseline == pytest.approx(baseline, abs=1e-5)
    # raw positions on request: the method's own numbers
    raw = attribute(model, pairs, sites=["resid"], method=method, slots=False, **kw)
    direct = fn(model, pairs.clean_tokens, pairs.corrupt_tokens, metric, ["resid"], **kw)
    torch.testing.assert_close(raw["resid"].values, direct["resid"].values, atol=0, rtol=0)


def test_per_prompt_atp_through_the_front_door_keeps_prompts():
    model = models.load("tiny-llama")
    pairs = fake_pairs(model)
    per = attribute(model, pairs, sites=["resid", "heads"], per_prompt=True)
    mean = attribute(model, pairs, sites=["resid", "heads"])
    assert per["resid"].dims == ("layer", "prompt", "slot")
    assert per["heads"].dims == ("layer", "prompt", "head")
    assert mean["heads"].dims == ("layer", "head") and "prompt" not in mean["heads"].labels
    for fam in ("resid", "heads"):
        torch.testing.assert_close(per[fam].values.mean(1), mean[fam].values)
    # RelP has no per-prompt option: it goes by template groups, and its rules off are AtP
    grouped = attribute(model, pairs, sites=["resid", "heads"], method="relp", rules=LRPRules.off())
    for fam in ("resid", "heads"):
        torch.testing.assert_close(grouped[fam].values, mean[fam].values, atol=1e-5, rtol=1e-5)


def test_per_prompt_atp_by_slot_and_its_errors():
    """`by_slot` of per-prompt AtP (one pass) = the hand aggregation of each prompt alone; the
    batch-summed scores of a mixed batch are refused with the reason."""
    model = models.load("tiny-llama")
    pairs = fake_pairs(model)
    metric = pairs.metric(model)
    per = attribution_patching(model, pairs.clean_tokens, pairs.corrupt_tokens, metric,
                               ["resid", "heads_by_pos"], per_prompt=True)
    alone = one_by_one(attribution_patching, model, pairs, metric, ["resid", "heads_by_pos"])
    slotted = by_slot(per, pairs)
    torch.testing.assert_close(slotted["resid"].values, by_hand([a["resid"].values for a in alone], pairs),
                               atol=1e-5, rtol=1e-5)
    # heads_by_pos: [layer, pos, head] -> [layer, slot, head], head by head
    hp = slotted["heads_by_pos"]
    assert hp.dims == ("layer", "slot", "head")
    for h in range(model.cfg.n_heads):
        expected = by_hand([a["heads_by_pos"].values[:, :, h] for a in alone], pairs)
        torch.testing.assert_close(hp.values[:, :, h], expected, atol=1e-5, rtol=1e-5)
    kept = by_slot(per["resid"], pairs, keep_prompts=True)
    assert kept.dims == ("layer", "prompt", "slot")
    torch.testing.assert_close(kept.values.mean(1), slotted["resid"].values)
    summed = attribution_patching(model, pairs.clean_tokens, pairs.corrupt_tokens, metric, ["resid"])
    with pytest.raises(ValueError, match="2 different sets of positions"):
        by_slot(summed, pairs)


def test_by_slot_of_hand_made_per_prompt_scores():
    """Weights by hand: slot values read at each prompt's positions, `other` summed or averaged
    over the prompt's other real positions (padding left out), a missing slot scoring 0."""
    from interp.attribution.sites import Scores

    model = models.load("tiny-llama")
    pairs = fake_pairs(model, rows=(0, 1, 1))
    pairs.positions["S1"][2] = -1  # prompt 2's template has no S1
    values = torch.randn(2, 3, 9)  # layer prompt pos
    s = Scores("resid", "atp", values, ("layer", "prompt", "pos"),
               {"layer": ["0", "1"], "prompt": ["0", "1", "2"], "pos": [str(i) for i in range(9)]})
    for other in ("sum", "mean"):
        got = by_slot(s, pairs, other=other, keep_prompts=True).values
        for b in range(3):
            slots = [int(pairs.positions[k][b]) for k in ("IO", "S1", "S2", "end")]
            rest = [p for p in range(int(pairs.end_pos[b]) + 1) if p not in slots]
            for k, p in enumerate(slots):
                expected = values[:, b, p] if p >= 0 else torch.zeros(2)
                torch.testing.assert_close(got[:, b, k], expected)
            agg = values[:, b, rest].sum(1) if other == "sum" else values[:, b, rest].mean(1)
            torch.testing.assert_close(got[:, b, 4], agg)
    # totals agree: summed over slots, a prompt's slot scores are its real positions' scores
    # (prompt 2's S1 position, in no slot now, counts in `other`)
    total = by_slot(s, pairs, keep_prompts=True).values.sum(-1)
    real = torch.arange(9)[None, :] <= pairs.end_pos[:, None]
    torch.testing.assert_close(total, (values * real).sum(-1))
    torch.testing.assert_close(by_slot(s, pairs).values, by_slot(s, pairs, keep_prompts=True).values.mean(1))


def test_single_template_pairs_keep_raw_positions():
    model = models.load("tiny-llama")
    pairs = fake_pairs(model, rows=(1, 1, 1))
    metric = pairs.metric(model)
    front = attribute(model, pairs, sites=["resid"])
    direct = attribution_patching(model, pairs.clean_tokens, pairs.corrupt_tokens, metric, ["resid"])
    assert front["resid"].dims == ("layer", "pos")
    assert torch.equal(front["resid"].values, direct["resid"].values)
    # by slot on request: read off the batch scores by hand (one template: one set of positions)
    slotted = attribute(model, pairs, sites=["resid"], slots=True)["resid"]
    v = direct["resid"].values
    slots = [TEMPLATES[1][1][k] for k in ("IO", "S1", "S2")] + [8]
    rest = [p for p in range(9) if p not in slots]
    expected = torch.stack([*(v[:, p] for p in slots), v[:, rest].sum(1)], dim=1)
    torch.testing.assert_close(slotted.values, expected)


def test_slot_grouping_needs_a_selectable_metric():
    model = models.load("tiny-llama")
    pairs = fake_pairs(model)
    fn = CallableMetric(lambda logits: pairs.logit_diff(logits), n_prompts=len(pairs))
    with pytest.raises(ValueError, match="runs each template group on its own"):
        attribute(model, pairs, fn, sites=["resid"], method="ig_inputs")
    # AtP needs no groups (per-prompt scores in one pass): the function's own per-prompt values
    atp = attribute(model, pairs, fn, sites=["resid"])["resid"]
    same = attribute(model, pairs, sites=["resid"], metric=LogitDiff(
        pairs.answer_ids, pairs.wrong_ids, end_pos=pairs.end_pos))["resid"]
    torch.testing.assert_close(atp.values, same.values)
    # without position families nothing is grouped, and any metric works
    assert attribute(model, pairs, fn, sites=["heads"])["heads"].dims == ("layer", "head")


def test_ioi_pairs_on_the_default_model(default_model):
    """Generated IOI pairs of three templates: the default metric is the pairs' own, head scores
    are AtP's on the whole batch, residual scores come by slot and equal per-prompt AtP."""
    model = default_model
    pairs = generate_ioi(model, 3, seed=1)
    assert len(set(pairs.template.tolist())) == 3
    metric = pairs.metric(model)
    front = attribute(model, pairs, sites=["resid", "heads"])
    direct = attribution_patching(model, pairs.clean_tokens, pairs.corrupt_tokens, metric, ["heads"])
    assert front["heads"].values.abs().max() > 1e-3
    torch.testing.assert_close(front["heads"].values, direct["heads"].values, atol=1e-5, rtol=1e-4)
    per = attribution_patching(model, pairs.clean_tokens, pairs.corrupt_tokens, metric, ["resid"],
                               per_prompt=True)
    assert front["resid"].labels["slot"] == ["IO", "S1", "S2", "end", "other"]
    torch.testing.assert_close(front["resid"].values, by_slot(per["resid"], pairs).values,
                               atol=1e-5, rtol=1e-4)
    top = front["resid"].top(1)[0]
    assert top["slot"] in front["resid"].labels["slot"]


def test_logit_diff_given_with_pairs_is_used():
    model = models.load("tiny-llama")
    pairs = fake_pairs(model, rows=(0, 0))
    raw = LogitDiff(pairs.answer_ids, pairs.wrong_ids, end_pos=pairs.end_pos)
    front = attribute(model, pairs, raw, sites=["heads"])
    direct = attribution_patching(model, pairs.clean_tokens, pairs.corrupt_tokens, raw, ["heads"])
    assert torch.equal(front["heads"].values, direct["heads"].values)
