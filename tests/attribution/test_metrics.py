"""Metrics: each against a hand computation, every method with every kind of metric against
TransformerLens's own patching or a plain autograd reference, and the bad-input messages.

The hand computations and references here use plain torch ops on the full logits (log_softmax,
logsumexp over the set, `torch.nn.functional.kl_div`) and plain TransformerLens hooks; none of
them goes through interp's metric code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import patching as tl_patching

from interp import models
from interp.attribution.atp import attribution_patching
from interp.attribution.atp_star import atp_star
from interp.attribution.ig import integrated_gradients
from interp.attribution.lrp import LRPRules, lrp_rules
from interp.attribution.metrics import (
    CallableMetric,
    KLToClean,
    LogitDiff,
    LogProb,
    LogSumExpDiff,
    Metric,
    Prob,
    RefusalScore,
    as_metric,
)
from interp.attribution.patching import exact_patching
from interp.attribution.relp import relp
from interp.concepts.refusal import refusal_log_odds

# ------------------------------------------------------------------------------------------
# Hand computations on random logits
# ------------------------------------------------------------------------------------------

BATCH, POS, VOCAB = 3, 5, 11
END = torch.tensor([4, 2, 3])


@pytest.fixture
def logits():
    return torch.randn(BATCH, POS, VOCAB, generator=torch.Generator().manual_seed(1)) * 2


def _ends(logits, end=END):
    return torch.stack([logits[b, int(end[b])] for b in range(logits.shape[0])])


def _hand_log_prob(x, sets):
    """log p(set) row by row: log_softmax, then logsumexp over the (deduplicated) set."""
    return torch.stack([x[r].log_softmax(-1)[sorted(set(s))].logsumexp(-1) for r, s in enumerate(sets)])


def test_logit_diff_by_hand(logits):
    answer, wrong = torch.tensor([1, 7, 3]), torch.tensor([2, 0, 9])
    metric = LogitDiff(answer, wrong, end_pos=END)
    x = _ends(logits)
    hand = torch.stack([x[b, answer[b]] - x[b, wrong[b]] for b in range(BATCH)])
    torch.testing.assert_close(metric(logits), hand)
    normed = LogitDiff(answer, wrong, clean=2.0, corrupt=-0.5, end_pos=END)
    torch.testing.assert_close(normed(logits), (hand + 0.5) / 2.5)


@pytest.mark.parametrize("per_prompt", [False, True], ids=["shared", "per-prompt"])
def test_log_prob_and_prob_by_hand(logits, per_prompt):
    sets = [[1, 4], [7], [0, 3, 5]] if per_prompt else [[2, 5, 5]] * BATCH  # duplicates count once
    tokens = sets if per_prompt else [2, 5, 5]
    x = _ends(logits)
    hand = _hand_log_prob(x, sets)
    log_prob = LogProb(tokens, end_pos=END)
    torch.testing.assert_close(log_prob(logits), hand)
    prob = torch.stack([x[r].softmax(-1)[sorted(set(s))].sum() for r, s in enumerate(sets)])
    torch.testing.assert_close(Prob(tokens, end_pos=END)(logits), prob)
    torch.testing.assert_close(LogProb(tokens, clean=-1.0, corrupt=-3.0, end_pos=END)(logits),
                               (hand + 3.0) / 2.0)
    # the last position when end_pos is not given; a 2-D tensor of sets is one set per prompt
    torch.testing.assert_close(LogProb(tokens)(logits), _hand_log_prob(logits[:, -1], sets))
    if per_prompt:
        as_tensor = torch.tensor([[1, 4], [7, 7], [0, 3]])
        torch.testing.assert_close(LogProb(as_tensor)(logits),
                                   _hand_log_prob(logits[:, -1], [[1, 4], [7], [0, 3]]))


def test_log_sum_exp_diff_by_hand(logits):
    positive, negative = [1, 2], [[3], [4, 5], [6, 7, 8]]
    metric = LogSumExpDiff(positive, negative, end_pos=END)
    x = _ends(logits)
    hand = torch.stack([x[r, positive].logsumexp(-1) - x[r, n].logsumexp(-1) for r, n in enumerate(negative)])
    torch.testing.assert_close(metric(logits), hand)
    # it reads only the two sets' columns
    assert metric.columns.shape == (BATCH, 2 + 3)
    cols = x.gather(-1, metric.columns)
    torch.testing.assert_close(metric.from_columns(cols), hand)
    # one token on each side: the logit difference
    single = LogSumExpDiff([1], [3], end_pos=END)
    torch.testing.assert_close(single(logits), x[:, 1] - x[:, 3])


def test_refusal_score_by_hand_and_equals_refusal_log_odds(logits):
    refusal = [0, 6, 6, 9]
    x = _ends(logits)
    metric = RefusalScore(refusal, end_pos=END)
    p = x.double().softmax(-1)[:, [0, 6, 9]].sum(-1)
    torch.testing.assert_close(metric(logits), (p.log() - (1 - p).log()).float())
    torch.testing.assert_close(metric(logits), refusal_log_odds(x, refusal), atol=1e-5, rtol=1e-5)
    per_prompt = RefusalScore([[0], [6, 9], [1, 2, 3]], end_pos=END)
    expected = torch.stack([refusal_log_odds(x[r:r + 1], s)[0] for r, s in enumerate([[0], [6, 9], [1, 2, 3]])])
    torch.testing.assert_close(per_prompt(logits), expected, atol=1e-5, rtol=1e-5)


def test_kl_to_clean_by_hand(logits):
    clean_logits = torch.randn(BATCH, VOCAB, generator=torch.Generator().manual_seed(2))
    metric = KLToClean(clean_logits, end_pos=END)
    x = _ends(logits)
    p, logq = clean_logits.softmax(-1), x.log_softmax(-1)
    torch.testing.assert_close(metric(logits), (p * (p.log() - logq)).sum(-1))
    torch.testing.assert_close(
        metric(logits),
        F.kl_div(logq, clean_logits.log_softmax(-1), reduction="none", log_target=True).sum(-1))
    # zero on the clean run itself, positive elsewhere
    clean_run = logits.clone()
    clean_run[torch.arange(BATCH), END] = clean_logits
    torch.testing.assert_close(metric(clean_run), torch.zeros(BATCH), atol=1e-6, rtol=0)
    assert (metric(logits) > 0).all()


def test_callable_metric_by_hand(logits):
    answer = torch.tensor([1, 7, 3])

    def fn(full):  # reads two positions
        return full[:, 0].log_softmax(-1)[torch.arange(3), answer] + full[:, -1, 0]

    hand = logits[:, 0].log_softmax(-1)[torch.arange(3), answer] + logits[:, -1, 0]
    torch.testing.assert_close(CallableMetric(fn)(logits), hand)
    torch.testing.assert_close(as_metric(fn)(logits), hand)
    torch.testing.assert_close(CallableMetric(fn, clean=1.0, corrupt=0.5)(logits), (hand - 0.5) / 0.5)
    # a scalar (batch mean, as TransformerLens's metrics) is every prompt's value
    scalar = CallableMetric(lambda full: fn(full).mean())
    torch.testing.assert_close(scalar(logits), hand.mean().expand(3))


def _all_metrics(n_vocab=VOCAB, batch=BATCH, end=END, clean_logits=None):
    gen = torch.Generator().manual_seed(3)
    if clean_logits is None:
        clean_logits = torch.randn(batch, n_vocab, generator=gen)
    return {
        "logit_diff": LogitDiff(torch.tensor([1, 7, 3]), torch.tensor([2, 0, 9]), end_pos=end),
        "log_prob": LogProb([2, 5], end_pos=end),
        "log_prob_per_prompt": LogProb([[1, 4], [7], [0, 3, 5]], end_pos=end),
        "prob": Prob([[1], [2, 3], [4]], end_pos=end),
        "lse_diff": LogSumExpDiff([1, 2], [[3], [4, 5], [6, 7, 8]], end_pos=end),
        "refusal": RefusalScore([0, 6, 9], end_pos=end),
        "kl": KLToClean(clean_logits, end_pos=end),
    }


@pytest.mark.parametrize("name", list(_all_metrics()))
def test_repeated_rows_select_and_devices(name, logits):
    """Rows stacked as (copies batch) are each read as prompt r % batch; select keeps rows
    (repeats allowed); a shared set is bound to the batch; every metric is a `Metric`."""
    metric = _all_metrics()[name].for_batch(BATCH, VOCAB)
    assert isinstance(metric, Metric) and len(metric) == BATCH
    other = logits * 0.5 + 1.0
    stacked = torch.cat([logits, other, logits])
    expected = torch.cat([metric(logits), metric(other), metric(logits)])
    torch.testing.assert_close(metric(stacked), expected)
    # from_columns on repeated rows: the logits at each row's prediction position
    ends = torch.cat([_ends(logits), _ends(other), _ends(logits)])
    cols = ends if metric.columns is None else ends.gather(-1, metric.columns.repeat(3, 1))
    torch.testing.assert_close(metric.from_columns(cols), expected)
    torch.testing.assert_close(metric.at_end(stacked), ends)
    picked = metric.select([2, 0, 2])
    assert len(picked) == 3
    torch.testing.assert_close(picked(logits[[2, 0, 2]]), metric(logits)[[2, 0, 2]])
    torch.testing.assert_close(metric.select(slice(1, 3))(logits[1:]), metric(logits)[1:])
    torch.testing.assert_close(metric.to("cpu")(logits), metric(logits))


@pytest.mark.parametrize("name", list(_all_metrics()))
@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_on_model_and_normalised_equal_the_full_logits(name, model_name):
    """`on_model` (which unembeds only the prediction positions, and only the needed columns)
    equals the metric of the model's own full logits; `normalised` maps the clean mean to 1
    and the corrupt mean to 0, both computed here from the model's full logits."""
    model = models.load(model_name)
    gen = torch.Generator().manual_seed(4)
    clean = torch.randint(0, model.cfg.d_vocab, (BATCH, 6), generator=gen)
    corrupt = torch.randint(0, model.cfg.d_vocab, (BATCH, 6), generator=gen)
    end = torch.tensor([5, 3, 4])
    with torch.no_grad():
        clean_logits, corrupt_logits = model(clean), model(corrupt)
    metric = _all_metrics(model.cfg.d_vocab, end=end, clean_logits=_ends(clean_logits, end))[name]
    with torch.no_grad():
        torch.testing.assert_close(metric.for_batch(BATCH).on_model(model, corrupt),
                                   metric(corrupt_logits), atol=1e-5, rtol=1e-5)
        normed = metric.normalised(model, clean, corrupt, batch_size=2)
        m_clean, m_corrupt = metric(clean_logits).mean(), metric(corrupt_logits).mean()
        assert abs(m_clean - m_corrupt) > 1e-3
        torch.testing.assert_close(normed(corrupt_logits), (metric(corrupt_logits) - m_corrupt) / (m_clean - m_corrupt),
                                   atol=1e-4, rtol=1e-4)
        assert normed(clean_logits).mean().item() == pytest.approx(1.0, abs=1e-4)


def test_plain_function_metric_takes_whole_copies_of_its_batch(logits):
    """The IG activation path evaluates `select` of `(steps batch)` rows: whole copies only."""
    fn = lambda full: full[:, -1, 0] * full[:, 0, 1]  # noqa: E731
    metric = as_metric(fn, BATCH)
    copies = metric.select(torch.arange(BATCH).repeat(2))
    assert len(copies) == 2 * BATCH
    torch.testing.assert_close(copies(torch.cat([logits, -logits])), torch.cat([fn(logits), fn(-logits)]))
    with pytest.raises(ValueError, match="cannot be restricted"):
        metric.select([1, 0, 2])


def test_full_vocabulary_rows_in_chunks_give_the_same_numbers(monkeypatch):
    """Beyond `LOGIT_CHUNK_BYTES` of full-vocabulary logits, patched rows are unembedded in
    chunks of whole copies of the batch: the scores do not change."""
    from interp.attribution import metrics

    model = models.load("tiny-llama")
    clean, corrupt, end = _pairs(model)
    metric = RefusalScore([[1, 2], [3], [4, 5, 6]], end_pos=end)
    whole = exact_patching(model, clean, corrupt, metric, ["resid", "heads"], progress=False)
    monkeypatch.setattr(metrics, "LOGIT_CHUNK_BYTES", 1)  # one copy of the batch per chunk
    chunked = exact_patching(model, clean, corrupt, metric, ["resid", "heads"], progress=False)
    for fam in whole:
        assert whole[fam].values.abs().max() > 1e-3
        torch.testing.assert_close(chunked[fam].values, whole[fam].values, atol=1e-6, rtol=0)


def test_kl_to_clean_from_model():
    model = models.load("tiny-llama")
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 6))
    end = torch.tensor([5, 2, 3, 5])
    with torch.no_grad():
        full = model(tokens)
    metric = KLToClean.from_model(model, tokens, end_pos=end, batch_size=3)
    torch.testing.assert_close(metric.clean_logprobs, _ends(full, end).log_softmax(-1), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert metric.on_model(model, tokens).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------
# Exact patching with every kind of metric against TransformerLens's generic patching
# ------------------------------------------------------------------------------------------

TL_FUNCTIONS = {
    "resid": tl_patching.get_act_patch_resid_pre,
    "mlp": tl_patching.get_act_patch_mlp_out,
    "heads": tl_patching.get_act_patch_attn_head_out_all_pos,
    "heads_by_pos": tl_patching.get_act_patch_attn_head_out_by_pos,
}


def _pairs(model, batch=3, pos=7, seed=0):
    """Clean/corrupt batches differing at positions 2 and 4; right-padded prompts ending at
    `end` (the short ones have random padding after their end)."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    corrupt[:, 4] = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    end = torch.tensor([pos - 1, pos - 2, pos - 1])[:batch]
    return clean, corrupt, end


def _cases(model, clean, end):
    """(our metric, the same metric as a plain function on full logits written by hand)."""
    rows = torch.arange(clean.shape[0])
    positive, negative = [5, 17], [[3, 9], [40], [41, 42, 43]]
    with torch.no_grad():
        clean_end = model(clean)[rows, end]

    def at_end(logits):
        return logits[rows, end]

    def log_prob(logits):
        return at_end(logits).log_softmax(-1)[:, [5, 17, 200]].logsumexp(-1)

    def lse_diff(logits):
        x = at_end(logits)
        return torch.stack([x[r, positive].logsumexp(-1) - x[r, n].logsumexp(-1) for r, n in enumerate(negative)])

    def kl(logits):
        return F.kl_div(at_end(logits).log_softmax(-1), clean_end.log_softmax(-1), reduction="none",
                        log_target=True).sum(-1)

    def next_token_log_likelihood(logits):  # reads every position: the all-positions path
        return logits[:, :-1].log_softmax(-1).gather(-1, clean[:, 1:, None])[..., 0].sum(-1)

    return {
        "log_prob": (LogProb([5, 17, 200], end_pos=end), log_prob),
        "lse_diff": (LogSumExpDiff(positive, negative, end_pos=end), lse_diff),
        "kl": (KLToClean(clean_end, end_pos=end), kl),
        "callable": (next_token_log_likelihood, next_token_log_likelihood),
    }


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("case", ["log_prob", "lse_diff", "kl", "callable"])
def test_exact_patching_equals_transformer_lens_with_any_metric(model_name, case):
    """call_cost 0 makes every position its own chunk, so most patched runs start at p0 > 0 from
    a KV cache (and, for the plain function, reuse the target's logits before p0)."""
    model = models.load(model_name)
    clean, corrupt, end = _pairs(model)
    ours_metric, hand = _cases(model, clean, end)[case]
    direction = "noise" if case == "kl" else "denoise"
    ours = exact_patching(model, clean, corrupt, ours_metric, list(TL_FUNCTIONS), direction=direction,
                          progress=False, call_cost=0.0)
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    _, source_cache = model.run_with_cache(source)
    for fam, tl_function in TL_FUNCTIONS.items():
        theirs = tl_function(model, target, source_cache, lambda logits: hand(logits).mean())
        mine = ours[fam].values + ours[fam].baseline
        assert mine.shape == theirs.shape, fam
        diff = (mine - theirs.cpu()).abs().max().item()
        assert diff <= 1e-4, f"{case} {fam}: max |diff| {diff}"
    assert ours["resid"].values.abs().max() > 1e-2  # some sites matter: not zeros against zeros


def test_exact_patching_normalised_set_metric_and_callable_equal_the_builtin():
    """A normalised `LogProb` against TL with the normalisation applied by hand; the same
    metric written as a plain function (and as a scalar batch mean) gives the same scores."""
    model = models.load("tiny-llama")
    clean, corrupt, end = _pairs(model)
    metric = LogProb([5, 17, 200], end_pos=end).normalised(model, clean, corrupt)
    fams = ["resid", "heads"]
    ours = exact_patching(model, clean, corrupt, metric, fams, progress=False)
    rows = torch.arange(3)

    def hand(logits):
        lp = logits[rows, end].log_softmax(-1)[:, [5, 17, 200]].logsumexp(-1)
        return (lp - metric.corrupt) / (metric.clean - metric.corrupt)

    _, source_cache = model.run_with_cache(clean)
    theirs = tl_patching.get_act_patch_resid_pre(model, corrupt, source_cache, lambda x: hand(x).mean())
    torch.testing.assert_close(ours["resid"].values + ours["resid"].baseline, theirs, atol=1e-4, rtol=0)
    for fn in (hand, lambda x: hand(x).mean()):
        plain = exact_patching(model, clean, corrupt, fn, fams, progress=False)
        for fam in fams:
            torch.testing.assert_close(plain[fam].values, ours[fam].values, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# Gradient methods against plain autograd
# ------------------------------------------------------------------------------------------

HOOKS = {"resid": "blocks.{L}.hook_resid_pre", "attn": "blocks.{L}.hook_attn_out",
         "mlp": "blocks.{L}.hook_mlp_out", "heads": "blocks.{L}.attn.hook_z"}
SUMMED = {"resid": (0, 2), "attn": (0, 2), "mlp": (0, 2), "heads": (0, 1, 3)}
FAMS = list(HOOKS)


def _plain_grads(model, tokens, fn, names, fwd_hooks=()):
    """Activations at `names` and d mean(fn(logits)) / d activation by TransformerLens hooks
    and `torch.autograd.grad` on the full logits."""
    kept = {}

    def start_graph(act, hook):
        return act.detach().requires_grad_(True)

    def keep(act, hook):
        kept[hook.name] = act

    hooks = [("hook_embed", start_graph), *fwd_hooks, *[(n, keep) for n in names]]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        value = fn(model(tokens)).mean()
    grads = torch.autograd.grad(value, [kept[n] for n in names], allow_unused=True)
    return kept, {n: g if g is not None else torch.zeros_like(kept[n]) for n, g in zip(names, grads)}


def _scores(model, fams, delta, grad):
    return {f: torch.stack([(delta[HOOKS[f].format(L=layer)] * grad[HOOKS[f].format(L=layer)]).sum(SUMMED[f])
                            for layer in range(model.cfg.n_layers)]).detach() for f in fams}


def _plain_atp(model, clean, corrupt, fn, fams):
    """Denoising AtP: (a_clean - a_corrupt) . grad on the corrupt run."""
    names = [HOOKS[f].format(L=layer) for f in fams for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, source = model.run_with_cache(clean, names_filter=lambda n: n in names)
    kept, grad = _plain_grads(model, corrupt, fn, names)
    return _scores(model, fams, {n: source[n] - kept[n].detach() for n in names}, grad)


def _plain_ig_inputs(model, clean, corrupt, fn, fams, steps):
    """The embeddings (and position embeddings) moved from corrupt to clean, the gradient
    averaged over the midpoints, one plain forward and backward pass per point."""
    names = [HOOKS[f].format(L=layer) for f in fams for layer in range(model.cfg.n_layers)]
    embeds = [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_dict]
    with torch.no_grad():
        _, src = model.run_with_cache(clean, names_filter=lambda n: n in {*names, *embeds})
        _, tgt = model.run_with_cache(corrupt, names_filter=lambda n: n in {*names, *embeds})
    mean = {n: torch.zeros_like(tgt[n]) for n in names}
    for k in range(steps):
        alpha = (k + 0.5) / steps
        hooks = [(e, lambda act, hook, a=alpha: (tgt[hook.name] + a * (src[hook.name] - tgt[hook.name]))
                  .requires_grad_(True)) for e in embeds]
        _, grad = _plain_grads(model, corrupt, fn, names, hooks)
        for n in names:
            mean[n] += grad[n] / steps
    return _scores(model, fams, {n: src[n] - tgt[n] for n in names}, mean)


def _plain_ig_activations(model, clean, corrupt, fn, fams, steps):
    """Each hook point alone moved from its corrupt to its clean value, one alpha at a time."""
    names = [HOOKS[f].format(L=layer) for f in fams for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, src = model.run_with_cache(clean, names_filter=lambda n: n in names)
        _, tgt = model.run_with_cache(corrupt, names_filter=lambda n: n in names)
    mean = {}
    for n in names:
        mean[n] = torch.zeros_like(tgt[n])
        for k in range(steps):
            point = (tgt[n] + (k + 0.5) / steps * (src[n] - tgt[n])).requires_grad_(True)
            with torch.enable_grad(), model.hooks(fwd_hooks=[(n, lambda act, hook, p=point: p)]):
                value = fn(model(corrupt)).mean()
            mean[n] += torch.autograd.grad(value, point)[0] / steps
    return _scores(model, fams, {n: src[n] - tgt[n] for n in names}, mean)


def _gradient_cases(model, clean, corrupt):
    """A token-set metric and KL to the clean run, each with its hand-written plain function."""
    rows = torch.arange(clean.shape[0])
    end = torch.tensor([5, 4, 5])
    with torch.no_grad():
        clean_end = model(clean)[rows, end]

    def lse_diff(logits):
        x = logits[rows, end]
        return x[:, [5, 17]].logsumexp(-1) - x[:, [3, 9, 30]].logsumexp(-1)

    def refusal(logits):
        p = logits[rows, end].softmax(-1)[:, [0, 6, 9]].sum(-1)
        return p.log() - (1 - p).log()

    def kl(logits):
        return F.kl_div(logits[rows, end].log_softmax(-1), clean_end.log_softmax(-1), reduction="none",
                        log_target=True).sum(-1)

    return {
        "lse_diff": (LogSumExpDiff([5, 17], [3, 9, 30], end_pos=end), lse_diff),
        "refusal": (RefusalScore([0, 6, 9], end_pos=end), refusal),
        "kl": (KLToClean(clean_end, end_pos=end), kl),
    }


def _tiny_float64(name):
    model = models.load(name, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (3, 6), generator=gen)
    corrupt = torch.randint(0, model.cfg.d_vocab, (3, 6), generator=gen)
    return model, clean, corrupt


def _close(ours, reference, fams, what, atol=1e-5):
    for fam in fams:
        assert reference[fam].abs().max() > 1e-3, f"{what} {fam}: zeros"
        torch.testing.assert_close(ours[fam].values, reference[fam].float(), atol=atol, rtol=1e-5,
                                   msg=lambda m, fam=fam: f"{what} {fam}: {m}")


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("case", ["lse_diff", "refusal", "kl"])
def test_atp_and_relp_equal_plain_autograd(model_name, case):
    """Float64 weights; the plain function gives the same numbers as the built-in metric."""
    model, clean, corrupt = _tiny_float64(model_name)
    metric, hand = _gradient_cases(model, clean, corrupt)[case]
    reference = _plain_atp(model, clean, corrupt, hand, FAMS)
    atp = attribution_patching(model, clean, corrupt, metric, FAMS)
    _close(atp, reference, FAMS, "atp")
    _close(attribution_patching(model, clean, corrupt, hand, FAMS), reference, FAMS, "atp (callable)")
    with lrp_rules(model, LRPRules.relp()):
        rel_reference = _plain_atp(model, clean, corrupt, hand, FAMS)
    _close(relp(model, clean, corrupt, metric, FAMS), rel_reference, FAMS, "relp")
    _close(relp(model, clean, corrupt, hand, FAMS), rel_reference, FAMS, "relp (callable)")
    assert (rel_reference["mlp"] - reference["mlp"]).abs().max() > 1e-4  # the rules did something


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("case", ["lse_diff", "kl"])
def test_integrated_gradients_equal_plain_autograd(model_name, case):
    model, clean, corrupt = _tiny_float64(model_name)
    metric, hand = _gradient_cases(model, clean, corrupt)[case]
    fams = ["resid", "heads"]
    reference = _plain_ig_inputs(model, clean, corrupt, hand, fams, steps=3)
    _close(integrated_gradients(model, clean, corrupt, metric, fams, steps=3), reference, fams, "ig")
    _close(integrated_gradients(model, clean, corrupt, hand, fams, steps=3), reference, fams, "ig (callable)")
    reference = _plain_ig_activations(model, clean, corrupt, hand, fams, steps=3)
    for m, what in ((metric, "ig activations"), (hand, "ig activations (callable)")):
        _close(integrated_gradients(model, clean, corrupt, m, fams, steps=3, path="activations"),
               reference, fams, what)


def test_atp_star_callable_equals_builtin():
    model, clean, corrupt = _tiny_float64("tiny-llama")
    for case, (metric, hand) in _gradient_cases(model, clean, corrupt).items():
        fams = ["resid", "heads", "heads_by_pos"]
        builtin = atp_star(model, clean, corrupt, metric, fams)
        plain = atp_star(model, clean, corrupt, hand, fams)
        for fam in fams:
            assert builtin[fam].values.abs().max() > 1e-3, (case, fam)
            torch.testing.assert_close(plain[fam].values, builtin[fam].values, atol=1e-6, rtol=1e-6)
        # without the residual QK fix (qk_layers=0) the resid scores of AtP* are AtP's
        no_fix = atp_star(model, clean, corrupt, metric, ["resid"], qk_layers=0)
        torch.testing.assert_close(no_fix["resid"].values,
                                   _plain_atp(model, clean, corrupt, hand, ["resid"])["resid"].float(),
                                   atol=1e-5, rtol=1e-5)


def test_circuit_metric_takes_any_metric():
    """`saes.circuits.circuit_metric` with the residual stream at layer 1 mean-ablated except at
    position 2: a set metric and the same plain function equal the hand computation."""
    from interp.attribution.sites import families
    from interp.saes.circuits import ablation_means, circuit_metric

    model = models.load("tiny-llama")
    clean, corrupt, end = _pairs(model)
    fams = families(["resid"])
    means = ablation_means(model, corrupt, fams)
    keep = {"resid": torch.zeros(2, clean.shape[1], dtype=torch.bool)}
    keep["resid"][0] = True
    keep["resid"][1, 2] = True
    rows = torch.arange(3)

    def hand(logits):
        return logits[rows, end].log_softmax(-1)[:, [5, 17]].logsumexp(-1)

    def ablate(act, hook):
        mean = means[hook.name].expand_as(act).clone()
        mean[:, 2] = act[:, 2]
        return mean

    with torch.no_grad():
        expected = hand(model.run_with_hooks(clean, fwd_hooks=[("blocks.1.hook_resid_pre", ablate)])).mean().item()
        unablated = hand(model(clean)).mean().item()
    assert abs(expected - unablated) > 1e-3
    for metric in (LogProb([5, 17], end_pos=end), hand):
        got = circuit_metric(model, clean, metric, fams, keep, means)
        assert got == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_metric_rows_that_do_not_match_the_batch_are_named():
    model = models.load("tiny-gpt2")
    clean, corrupt, _ = _pairs(model)
    two = {
        "LogitDiff": LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4])),
        "LogProb": LogProb([[1], [2]]),
        "LogSumExpDiff": LogSumExpDiff([1], [[2], [3]]),
        "RefusalScore": RefusalScore([1, 2], end_pos=torch.tensor([6, 6])),
        "KLToClean": KLToClean(torch.randn(2, model.cfg.d_vocab)),
        "CallableMetric": CallableMetric(lambda x: x[:, -1, 0], n_prompts=2),
    }
    methods = {"exact": lambda m: exact_patching(model, clean, corrupt, m, ["resid"], progress=False),
               "atp": lambda m: attribution_patching(model, clean, corrupt, m, ["resid"]),
               "ig": lambda m: integrated_gradients(model, clean, corrupt, m, ["resid"], steps=2),
               "atp_star": lambda m: atp_star(model, clean, corrupt, m, ["resid"]),
               "relp": lambda m: relp(model, clean, corrupt, m, ["resid"])}
    for name, metric in two.items():
        for run in methods.values():
            with pytest.raises(ValueError, match=rf"\({name}\) has answers for 2 prompts but the batch has 3"):
                run(metric)
    # a plain function that returns the wrong number of values
    for run in methods.values():
        with pytest.raises(ValueError, match=r"returned shape \(2,\) for a batch of 3 prompts"):
            run(lambda logits: logits[:2, -1, 0])
    # a plain function of the batch cannot be restricted to some of its prompts
    with pytest.raises(ValueError, match="cannot be restricted"):
        as_metric(lambda logits: logits[:, -1, 0], 3).select([0, 2])
    # per-prompt inputs that disagree with each other
    with pytest.raises(ValueError, match="disagree on the number of prompts"):
        LogProb([[1], [2]], end_pos=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="2 positive and 3 negative token sets"):
        LogSumExpDiff([[1], [2]], [[3], [4], [5]])
    with pytest.raises(ValueError, match="end_pos ranges over 0..9 but the tokens have 7"):
        exact_patching(model, clean, corrupt, LogProb([1], end_pos=torch.tensor([0, 9, 1])), ["resid"],
                       progress=False)


def test_token_ids_outside_the_vocabulary_are_named():
    model = models.load("tiny-gpt2")
    clean, corrupt, _ = _pairs(model)
    v = model.cfg.d_vocab
    for metric in (LogProb([1, v]), Prob([[1], [2], [v + 3]]), RefusalScore([v]),
                   LogSumExpDiff([1], [v]), LogitDiff(torch.tensor([1, 2, v]), torch.tensor([0, 0, 0]))):
        name = type(metric).__name__
        with pytest.raises(ValueError, match=rf"{name}: .* must be token ids in \[0, {v}\)"):
            exact_patching(model, clean, corrupt, metric, ["resid"], progress=False)
        with pytest.raises(ValueError, match=rf"{name}: .* must be token ids in \[0, {v}\)"):
            attribution_patching(model, clean, corrupt, metric, ["resid"])
    with pytest.raises(ValueError, match=r"must be token ids in \[0, 11\)"):
        LogProb([3, 11])(torch.randn(3, 5, 11))
    with pytest.raises(ValueError, match="token ids must be >= 0, got -1"):
        LogProb([3, -1])
    with pytest.raises(ValueError, match=f"clean logits have 7 columns but the model's vocabulary has {v}"):
        exact_patching(model, clean, corrupt, KLToClean(torch.randn(3, 7)), ["resid"], progress=False)


def test_empty_token_sets_are_named():
    with pytest.raises(ValueError, match="LogProb: the token set is empty"):
        LogProb([])
    with pytest.raises(ValueError, match="LogProb: the token set is empty"):
        LogProb(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="Prob: the token set of prompt 1 is empty"):
        Prob([[1], [], [2]])
    with pytest.raises(ValueError, match=r"RefusalScore: the token set is empty"):
        RefusalScore([])
    with pytest.raises(ValueError, match=r"LogSumExpDiff \(negative\): the token set is empty"):
        LogSumExpDiff([1], [])
    with pytest.raises(ValueError, match=r"token ids \[2\] are in both the positive and the negative set"):
        LogSumExpDiff([1, 2], [2, 3])


@pytest.mark.unchecked
def test_wrongly_typed_metrics_are_named():
    model = models.load("tiny-gpt2")
    clean, corrupt, _ = _pairs(model)
    with pytest.raises(ValueError, match="metric must be a Metric .* got int"):
        exact_patching(model, clean, corrupt, 3, ["resid"], progress=False)
    with pytest.raises(ValueError, match="token ids must be integers, got a torch.float32 tensor"):
        LogProb(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="must return a tensor"):
        attribution_patching(model, clean, corrupt, lambda logits: 1.0, ["resid"])
