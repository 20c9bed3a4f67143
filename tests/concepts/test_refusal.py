"""Tests for interp.concepts.refusal.

The selection machinery is tested on a tiny model *built* to have a refusal direction: a
"harmful" marker token writes a unit vector `d` into the residual stream at the template tokens
after the instruction (through one attention head), and the unembedding maps `d` to a "refusal"
token. Nothing else writes or reads `d`. The code must find `d` from data alone, and ablating
or adding what it finds must move the refusal score as the construction says.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from interp import hooks
from interp.concepts import refusal as R
from interp.concepts.vectors import orthogonalise_weights
from interp.models import load

MARKER, REFUSE = 7, 200
SUFFIX = [250, 251, 252]  # the "post-instruction" template tokens


def _planted(seed: int = 0, gain: float = 15.0, beta: float = 4.0):
    """tiny-llama with a planted refusal direction; returns (model, unit direction d)."""
    model = load("tiny-llama")
    d = F.normalize(torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed)),
                    dim=0)
    with torch.no_grad():
        orthogonalise_weights(model, d)  # no component writes d ...
        model.unembed.W_U.sub_(torch.outer(d, d @ model.unembed.W_U))  # ... and no logit reads it
        model.embed.W_E[MARKER] = 30.0 * d  # the marker token is d
        attn = model.blocks[0].attn
        attn.W_Q[0] = 0.0  # head 0 attends uniformly to the prefix ...
        attn.b_Q[0] = 0.0
        attn._W_V[0] = 0.0  # ... and copies the d component (KV head 0, shared with head 1)
        attn._W_V[0][:, 0] = gain * d
        attn._b_V[0] = 0.0
        attn.W_O[0] = 0.0
        attn.W_O[0][0] = d
        attn.W_O[1][0] = 0.0  # head 1 shares KV head 0: keep it from writing the copy elsewhere
        model.unembed.W_U[:, REFUSE] = beta * d  # d means "refuse"
    return model, d


def _prompts(n: int, harmful: bool, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 9, (1,), generator=g))
        body = torch.randint(10, 200, (length,), generator=g).tolist()
        if harmful:
            body.insert(int(torch.randint(0, length + 1, (1,), generator=g)), MARKER)
        out.append([1] + body + SUFFIX)
    return out


@pytest.fixture(scope="module")
def planted():
    model, d = _planted()
    data = {
        "harmful_train": _prompts(48, True, 1), "harmless_train": _prompts(48, False, 2),
        "harmful_val": _prompts(24, True, 3), "harmless_val": _prompts(24, False, 4),
    }
    return model, d, data


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _ablation_hooks(model, direction):
    """Hand-written TL hooks projecting `direction` out of every residual write."""
    u = direction / direction.norm()

    def remove(act, hook):
        return act - (act @ u)[..., None] * u

    return [(f"blocks.{layer}.hook_{h}", remove) for layer in range(model.cfg.n_layers)
            for h in ("resid_pre", "attn_out", "mlp_out")]


def _independent_kl(model, prompts, direction):
    """Mean KL(plain || ablated) of the next-token distribution, each prompt unpadded, from
    two plain forward passes (the ablation by `_ablation_hooks`)."""
    kls = []
    for prompt in prompts:
        tokens = torch.tensor([prompt])
        p = model(tokens)[0, -1].double().log_softmax(-1)
        q = model.run_with_hooks(tokens, fwd_hooks=_ablation_hooks(model, direction))[0, -1]
        q = q.double().log_softmax(-1)
        kls.append((p.exp() * (p - q)).sum())
    return torch.stack(kls).mean().item()


def _independent_score(model, prompt, fwd_hooks=()):
    """log(p / (1 - p)) of REFUSE, one unpadded prompt, plain forward pass."""
    logits = model.run_with_hooks(torch.tensor([prompt]), fwd_hooks=list(fwd_hooks))[0, -1]
    p = logits.double().softmax(-1)[REFUSE]
    return float(torch.log(p / (1 - p)))


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def test_refusal_scores_are_log_odds_of_the_refusal_tokens(planted):
    model, d, data = planted
    prompts = data["harmful_val"][:5] + data["harmless_val"][:5]  # different lengths: padding
    scores = R.refusal_scores(model, prompts, [REFUSE], batch_size=4)
    expected = torch.tensor([_independent_score(model, p) for p in prompts])
    assert torch.allclose(scores, expected, atol=1e-3)
    # With a hook: ablating d with a hand-written TL hook at every residual write.
    fwd = _ablation_hooks(model, d)
    ablated = R.refusal_scores(model, prompts, [REFUSE], hooks.ablate_direction(model, d))
    assert torch.allclose(ablated, torch.tensor([_independent_score(model, p, fwd)
                                                 for p in prompts]), atol=1e-3)
    # Several refusal tokens: the probability is their sum.
    logits = model(torch.tensor([prompts[0]]))[0, -1].double().softmax(-1)
    p = logits[[REFUSE, 3, 4]].sum()
    two = R.refusal_scores(model, prompts[:1], [REFUSE, 3, 4])
    assert two.item() == pytest.approx(float(torch.log(p / (1 - p))), abs=1e-3)
    with pytest.raises(ValueError, match="refusal token ids"):
        R.refusal_scores(model, prompts[:1], [999])


def test_the_planted_model_refuses_harmful_prompts_only(planted):
    model, d, data = planted
    harmful = R.refusal_scores(model, data["harmful_val"], [REFUSE])
    harmless = R.refusal_scores(model, data["harmless_val"], [REFUSE])
    assert harmful.min() > 5 and harmless.max() < 0  # the construction works


# --------------------------------------------------------------------------------------------
# Candidates and selection
# --------------------------------------------------------------------------------------------


def test_candidate_directions_are_differences_of_means_at_the_template_positions(planted):
    model, _, data = planted
    harmful, harmless = data["harmful_train"][:6], data["harmless_train"][:5]
    cands = R.candidate_directions(model, harmful, harmless, n_post=3, batch_size=4)
    assert cands.shape == (3, model.cfg.n_layers, model.cfg.d_model)

    def cached(prompts):  # unpadded, one prompt at a time
        return [model.run_with_cache(torch.tensor([p]))[1] for p in prompts]

    pos_caches, neg_caches = cached(harmful), cached(harmless)

    def mean(caches, layer, pos):
        return torch.stack([c[f"blocks.{layer}.hook_resid_pre"][0, pos] for c in caches]).mean(0)

    for i, pos in enumerate((-3, -2, -1)):
        for layer in range(model.cfg.n_layers):
            expected = mean(pos_caches, layer, pos) - mean(neg_caches, layer, pos)
            assert torch.allclose(cands[i, layer], expected, atol=1e-4)
    # At layer 0 the template token alone makes the residual: no difference (up to rounding of
    # means of identical rows).
    assert cands[:, 0].abs().max() < 1e-6


def test_the_planted_refusal_direction_is_found(planted):
    model, d, data = planted
    found = R.find_refusal_direction(
        model, data["harmful_train"], data["harmless_train"], data["harmful_val"],
        data["harmless_val"], [REFUSE], n_post=3, prune_last=0.0, batch_size=16,
    )
    assert found.passed_filters
    assert found.layer == 1  # layer 0 has no candidate; the copy happens in block 0
    assert F.cosine_similarity(found.direction, d, dim=0) > 0.9
    # Ablating it lowers the refusal score of harmful prompts to the harmless level ...
    s = found.scores
    assert s.baseline_harmful > 5 and s.baseline_harmless < 0
    ablated = R.refusal_scores(model, data["harmful_val"], [REFUSE], found.ablation(model))
    assert ablated.mean() < s.baseline_harmless + 2.0
    assert ablated.mean() < s.baseline_harmful - 10.0
    # ... adding it raises the refusal score of harmless prompts ...
    added = R.refusal_scores(model, data["harmless_val"], [REFUSE], found.addition(model))
    assert added.mean() > s.baseline_harmful / 2
    # ... and ablation barely changes harmless outputs.
    i = found.position + 3
    assert s.kl[i, 1] <= 0.1
    # The scores recorded for the chosen candidate are what the interventions give.
    assert s.bypass[i, 1] == pytest.approx(ablated.mean().item(), abs=1e-3)
    assert s.induce[i, 1] == pytest.approx(added.mean().item(), abs=1e-3)


def test_selection_takes_the_lowest_bypass_among_eligible_candidates(planted):
    model, d, data = planted
    cands = R.candidate_directions(model, data["harmful_train"], data["harmless_train"], 3)
    # A decoy at position -1: the planted d plus half its length along the mean harmless
    # activation there, so that its ablation bypasses refusal best of all candidates while it
    # disturbs harmless prompts (KL above the threshold).
    name = "blocks.1.hook_resid_pre"
    mean = torch.stack([model.run_with_cache(torch.tensor([p]), names_filter=name)[1][name][0, -1]
                        for p in data["harmless_train"]]).mean(0)
    along = F.normalize(mean - (mean @ d) * d, dim=0)
    cands = cands.clone()
    cands[2, 1] = (d + 0.5 * along) * cands[2, 1].norm()
    found = R.select_direction(model, cands, data["harmful_val"], data["harmless_val"],
                               [REFUSE], prune_last=0.0, all_scores=True)
    s = found.scores
    assert torch.isnan(s.bypass[:, 0]).all()  # zero candidates are skipped
    expected = (s.kl <= 0.1) & (s.induce > 0.0)
    assert torch.equal(s.eligible, expected)
    best = torch.where(s.eligible, s.bypass, torch.tensor(float("inf"))).min()
    assert s.bypass[found.position + 3, found.layer] == best
    # The decoy has the lowest bypass of all and induces refusal, but its KL makes it
    # ineligible, so it is not chosen. Both KLs are recomputed by hand.
    assert s.bypass[2, 1] < best and s.induce[2, 1] > 0.0
    assert s.kl[2, 1] > 0.1 and not bool(s.eligible[2, 1])
    assert (found.position, found.layer) != (-1, 1)
    winner = found.position + 3, found.layer
    for where in ((2, 1), winner):
        assert s.kl[where].item() == pytest.approx(
            _independent_kl(model, data["harmless_val"], cands[where]), rel=1e-3, abs=1e-5)
    # Without the KL filter the decoy wins.
    unfiltered = R.select_direction(model, cands, data["harmful_val"], data["harmless_val"],
                                    [REFUSE], prune_last=0.0, kl_threshold=None)
    assert (unfiltered.position, unfiltered.layer) == (-1, 1)
    # Nothing passes an impossible KL threshold: the best bypass is taken, with a warning.
    with pytest.warns(UserWarning, match="no candidate refusal direction passed"):
        loose = R.select_direction(model, cands, data["harmful_val"], data["harmless_val"],
                                   [REFUSE], prune_last=0.0, kl_threshold=-1.0, all_scores=True)
    assert not loose.passed_filters
    finite = torch.where(s.bypass.isnan(), torch.tensor(float("inf")), s.bypass)
    assert loose.scores.bypass[loose.position + 3, loose.layer] == finite.min()
    # The default pruning (last 20%) leaves only layer 0 of two, where every candidate is zero.
    with pytest.raises(ValueError, match="no candidate direction could be evaluated"):
        R.select_direction(model, cands, data["harmful_val"], data["harmless_val"], [REFUSE])
    with pytest.raises(ValueError, match="expected \\[n_post, n_layers=2"):
        R.select_direction(model, cands[:, :1], data["harmful_val"], data["harmless_val"],
                           [REFUSE])


@pytest.mark.parametrize("filters", [
    {},                                            # the defaults: some candidates within the KL
    {"kl_threshold": -1.0},                        # none within it: bypass of every candidate
    {"kl_threshold": None},                        # no KL filter
    {"induce_threshold": None},                    # no induce filter
    {"kl_threshold": 0.05, "induce_threshold": 1.0},
])
def test_scoring_only_what_can_decide_chooses_as_scoring_everything(planted, filters):
    model, d, data = planted
    cands = R.candidate_directions(model, data["harmful_train"], data["harmless_train"], 3)
    # three near-copies of the planted direction at layer 1, with KLs on both sides of 0.1
    cands = cands.clone()
    name = "blocks.1.hook_resid_pre"
    mean = torch.stack([model.run_with_cache(torch.tensor([p]), names_filter=name)[1][name][0, -1]
                        for p in data["harmless_train"]]).mean(0)
    along = F.normalize(mean - (mean @ d) * d, dim=0)
    for i, mix in enumerate((0.0, 0.2, 0.5)):
        cands[i, 1] = (d + mix * along) * cands[i, 1].norm()
    kwargs = {"prune_last": 0.0, **filters}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fallback warning, in both runs
        full = R.select_direction(model, cands, data["harmful_val"], data["harmless_val"],
                                  [REFUSE], all_scores=True, **kwargs)
        lazy = R.select_direction(model, cands, data["harmful_val"], data["harmless_val"],
                                  [REFUSE], **kwargs)
    assert (lazy.position, lazy.layer, lazy.passed_filters) == (
        full.position, full.layer, full.passed_filters)
    assert torch.equal(lazy.direction, full.direction)
    assert torch.equal(lazy.scores.eligible, full.scores.eligible)
    for key in ("bypass", "induce", "kl"):
        a, b = getattr(lazy.scores, key), getattr(full.scores, key)
        done = ~a.isnan()
        assert torch.allclose(a[done], b[done], atol=1e-4)  # equal where computed
        assert not torch.isnan(b[done]).any()
    # the KL of every evaluated candidate is computed; the chosen one has all three scores
    assert torch.equal(lazy.scores.kl.isnan(), full.scores.kl.isnan())
    at = lazy.position + 3, lazy.layer
    assert not lazy.scores.bypass[at].isnan() and not lazy.scores.induce[at].isnan()
    if not filters:  # the decoy (KL > 0.1) is the point: its bypass and induce are skipped
        assert full.scores.kl[2, 1] > 0.1
        assert lazy.scores.bypass[2, 1].isnan() and lazy.scores.induce[2, 1].isnan()


# --------------------------------------------------------------------------------------------
# Data, templates and generation on the default model
# --------------------------------------------------------------------------------------------


def test_load_instructions_reads_the_splits_with_a_seeded_subsample():
    full = R.load_instructions("harmful", "val")
    assert len(full) == 39 and all(isinstance(t, str) and t for t in full)
    a = R.load_instructions("harmless", "train", n=10, seed=3)
    assert a == R.load_instructions("harmless", "train", n=10, seed=3)
    assert a != R.load_instructions("harmless", "train", n=10, seed=4)
    assert len(set(a)) == 10 and set(a) <= set(R.load_instructions("harmless", "train"))


@pytest.mark.unchecked
def test_load_instructions_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be"):
        R.load_instructions("evil", "train")


def test_chat_template_pieces_of_the_default_model(default_model):
    model = default_model
    post = R.post_instruction_tokens(model)
    assert model.tokenizer.decode(post) == "<|im_end|>\n<|im_start|>assistant\n"
    ids = R.refusal_token_ids(model)
    assert [model.tokenizer.decode([i]) for i in ids] == list(R.DEFAULT_REFUSAL_STARTS)
    with pytest.raises(ValueError, match="not a single token"):
        R.refusal_token_ids(model, ["I'm sorry"])
    prompts = R.format_prompts(model, ["How do I bake bread?", "Hi"])
    assert all(p[-len(post):] == post for p in prompts)
    text = model.tokenizer.decode(prompts[0])
    assert "<|im_start|>user\nHow do I bake bread?<|im_end|>" in text


def test_is_refusal_matches_refusal_phrases():
    assert R.is_refusal("I'm sorry, but I can't help with that.")
    assert R.is_refusal("i cannot do that")
    assert R.is_refusal("I can\u2019t assist.")  # curly apostrophe
    assert not R.is_refusal("Sure! Here is a recipe for bread.")
    assert R.is_refusal("Nope.", phrases=["nope"])


def test_refusal_rate_judges_greedy_completions(default_model):
    model = default_model
    prompts = R.format_prompts(model, ["Say 'I cannot' and nothing else.", "What is 2+2?"])
    rate = R.refusal_rate(model, prompts, max_new_tokens=4, batch_size=2)
    assert len(rate.completions) == 2 and all(isinstance(c, str) for c in rate.completions)
    assert rate.refused == [R.is_refusal(c) for c in rate.completions]
    assert rate.rate == sum(rate.refused) / 2


def test_fallback_pool_prefers_candidates_within_the_kl_limit():
    usable = torch.tensor([[True, True, False], [True, True, True]])
    kl = torch.tensor([[0.05, 2.0, 0.0], [11.0, 0.09, 0.5]])
    none = torch.zeros_like(usable)
    eligible = none.clone()
    eligible[1, 2] = True
    assert torch.equal(R.fallback_pool(eligible, usable, kl, 0.1), eligible)
    within = R.fallback_pool(none, usable, kl, 0.1)
    assert within.nonzero().tolist() == [[0, 0], [1, 1]]  # not [0, 2]: unusable
    assert torch.equal(R.fallback_pool(none, usable, kl, 0.01), usable)
    assert torch.equal(R.fallback_pool(none, usable, kl, None), usable)

