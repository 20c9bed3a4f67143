"""The refusal direction (Arditi et al. 2024, arXiv 2406.11717) of a chat model, and what it does.

A thin study over `interp.concepts.refusal`: difference-of-means candidates
(harmful minus harmless instructions of Arditi et al.'s splits under `../shared/data/refusal/`)
at every layer's `resid_pre` and every post-instruction template position, selection on
validation prompts (lowest refusal score of harmful prompts under directional ablation, among
candidates whose ablation keeps the KL on harmless prompts <= 0.1 and whose addition raises the
harmless refusal score above 0; the last 20% of layers left out), then on held-out test
prompts: the mean refusal score (log-odds of refusal-starting tokens) and the refusal *rate*
(greedy completions judged by Arditi et al.'s refusal phrases) of harmful prompts clean and
with the direction ablated at every layer, and of harmless prompts clean and with it added at
its layer. Rates come with Wilson 95% intervals: with 32 test prompts one prompt is 0.03 and
the interval is about +-0.15.

The judge is substring matching: it misses refusals phrased otherwise and counts compliant text
that contains a refusal phrase. Every completion and its judgement is saved, so read them.

Needs a model with a chat template (the default `smollm2-135m-instruct`); a base model such as
`gemma-3-270m` stops with an error that says so. Cost on a CPU: selection runs one batched
forward pass of the harmless validation prompts per candidate (6 positions x 24 layers on
SmolLM2; `--layers` restricts them), then the bypass and induce passes only for candidates
that can be chosen (`--all-scores`: for all); generation `4 x n_test` completions of
`--max-new-tokens`. With `--n-test 64` and the other defaults SmolLM2 took 1,306 s wall, 608 s
CPU on a shared 2-core machine (the code before the behaviour toolkit: 4,025 s, 2,387 s CPU).

Measured on SmolLM2-135M-Instruct (seed 0, 64 train / 16 val / 64 test prompts of each kind, 48
tokens): it refuses 3 of 64 harmful test requests (0.05, 95% CI 0.02-0.13) and 1 of 64 harmless
ones. No candidate passes the filters (7 of 138 keep the KL <= 0.1, none raises the harmless
refusal score above 0), so the fallback is taken: the lowest bypass score among those within
the KL limit, layer 9, position -1 (KL 0.055). Ablating it leaves 2 of 64 harmful requests
refused; adding it changes nothing (1 of 64 harmless refused). The model has no refusal
direction to speak of at this size.

Writes `results.json` (the report of `refusal_report`, with the per-prompt judgements and
completions, the selection scores of every candidate, the intervals, timings) and prints a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens import HookedTransformer

from interp.concepts.refusal import (
    DEFAULT_REFUSAL_STARTS,
    RefusalDirection,
    SharedPrefix,
    find_refusal_direction,
    format_prompts,
    load_instructions,
    post_instruction_tokens,
    refusal_log_odds,
    refusal_rate,
    refusal_token_ids,
)
from interp.judges import judge_refusal, wilson_interval
from interp.studies import StudyConfig, StudyRun, option, options_parser, torch_threads

DESCRIPTION = ("Refusal direction (Arditi et al. 2024): find it on a chat model, then measure "
               "refusal rates of harmful prompts with it ablated and harmless ones with it added.")
CONDITIONS = ("harmful_clean", "harmful_ablated", "harmless_clean", "harmless_added")


@dataclass
class Options:
    """The study's options (the command line is built from them)."""

    n_train: int = option(64, "harmful and harmless training instructions each", minimum=1)
    n_val: int = option(16, "validation instructions each, for selection", minimum=1)
    n_test: int = option(32, "test instructions each, for scores and rates", minimum=1)
    max_new_tokens: int = option(48, "greedy completion length for the refusal rate", minimum=1)
    layers: Sequence[int] | None = option(None, "evaluate candidates at these layers only "
                                            "(default: all unpruned)")
    kl_threshold: float = option(0.1, "largest KL on harmless prompts under ablation")
    induce_threshold: float = option(0.0, "harmless refusal score under addition must exceed this")
    prune_last: float = option(0.2, "fraction of the last layers left out of selection")
    all_scores: bool = option(False, "score every candidate (default: the KL of every one, "
                                     "bypass and induce only where they can decide the choice)")
    generate: bool = option(True, "refusal scores only, no completions (much faster)",
                            negate="--no-generate")
    batch_size: int = option(32, "prompts per forward pass", minimum=1)
    threads: int | None = option(None, "torch CPU threads for this run (default: torch's own)",
                                 minimum=1)


add_arguments = options_parser(Options)


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of k/n (`interp.judges.wilson_interval`)."""
    return tuple(wilson_interval(k, n))


def _nan_to_none(t: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else v for v in row] for row in t.tolist()]


def refusal_report(
    model: HookedTransformer,
    study: StudyRun,
    n_train: int = 64,
    n_val: int = 32,
    n_test: int = 32,
    seed: int = 0,
    max_new_tokens: int = 64,
    refusal_starts: Sequence[str] = DEFAULT_REFUSAL_STARTS,
    batch_size: int = 16,
    generate: bool = True,
    **select_kwargs: Any,
) -> tuple[RefusalDirection, dict[str, Any]]:
    """Find the refusal direction of a chat model and measure what it does, honestly.

    Loads seeded subsamples of the harmful/harmless train, val and test splits, formats them
    with the chat template, finds the direction (`find_refusal_direction`), then on the test
    prompts measures the mean refusal score (clean, with the direction ablated on harmful
    prompts, added on harmless ones) and, with `generate`, the generation-based refusal rate
    of each of the four conditions, with a few example completions. The direction and each
    condition's completions are resume units of `study`.

    Returns:
        `(direction, report)`: the `RefusalDirection`, and a JSON-friendly dict with the
        settings, the selected layer/position and whether it passed the filters, its selection
        scores, the test instructions, mean test refusal scores, and (with `generate`) refusal
        rates, the per-prompt judgements behind them (`refused`), every completion
        (`completions`) and the first three of each condition (`examples`).
    """
    tokens = refusal_token_ids(model, refusal_starts)
    n_post = len(post_instruction_tokens(model))
    data = {
        (kind, split): format_prompts(model, load_instructions(kind, split, n, seed))
        for kind in ("harmful", "harmless")
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test))
    }
    with study.timer("select"):
        found = study.cached("direction", lambda: find_refusal_direction(
            model, data["harmful", "train"], data["harmless", "train"], data["harmful", "val"],
            data["harmless", "val"], tokens, n_post, batch_size=batch_size, **select_kwargs))
    harmful, harmless = data["harmful", "test"], data["harmless", "test"]
    ablate, add = found.ablation(model), found.addition(model)
    prompts = {"harmful_clean": (harmful, ()), "harmful_ablated": (harmful, ablate),
               "harmless_clean": (harmless, ()), "harmless_added": (harmless, add)}
    with study.timer("test_scores"):
        # the hooks act alike at every position, so the prompts' chat head is shared
        scores = {k: refusal_log_odds(SharedPrefix(model, p, batch_size).logits(h), tokens)
                  for k, (p, h) in prompts.items()}
    at = found.position + n_post, found.layer
    report: dict[str, Any] = {
        "settings": {"n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed,
                     "refusal_starts": list(refusal_starts), "refusal_token_ids": tokens,
                     "n_post": n_post, "max_new_tokens": max_new_tokens, **select_kwargs},
        "selected": {"layer": found.layer, "position": found.position,
                     "passed_filters": found.passed_filters,
                     "norm": float(found.direction.norm()),
                     "bypass": float(found.scores.bypass[at]),
                     "induce": float(found.scores.induce[at]),
                     "kl": float(found.scores.kl[at])},
        "val_baseline": {"harmful": found.scores.baseline_harmful,
                         "harmless": found.scores.baseline_harmless},
        "n_eligible": int(found.scores.eligible.sum()),
        "test_instructions": {kind: load_instructions(kind, "test", n_test, seed)
                              for kind in ("harmful", "harmless")},
        "test_scores": {k: float(v.mean()) for k, v in scores.items()},
    }
    if generate:
        with study.timer("generate"):
            rates = {k: study.cached(f"completions_{k}", lambda p=p, h=h: refusal_rate(
                model, p, h, max_new_tokens, batch_size)) for k, (p, h) in prompts.items()}
        report["refusal_rate"] = {k: r.rate for k, r in rates.items()}
        report["refused"] = {k: r.refused for k, r in rates.items()}
        report["completions"] = {k: r.completions for k, r in rates.items()}
        report["examples"] = {k: r.completions[:3] for k, r in rates.items()}
        report["refusal_count"] = {k: [sum(v), len(v)] for k, v in report["refused"].items()}
        report["refusal_rate_ci95"] = {k: list(wilson(*c)) for k, c in report["refusal_count"].items()}
        # both judges on every completion: the phrases, and the score at the first answer token
        report["judges"] = {}
        for k, (p, _) in prompts.items():
            judged = judge_refusal(rates[k].completions, scores[k].tolist(),
                                   prompt_texts=[model.tokenizer.decode(x) for x in p])
            judged.save(study.out / "judged" / k)
            report["judges"][k] = judged.summary()
    return found, report


def run(config: StudyConfig, **options: Any) -> dict:
    opts = Options(**options)
    with torch_threads(opts.threads), StudyRun("refusal-direction", config, opts,
                                               ignore=("batch_size", "threads")) as study:
        model = study.load_model()
        with torch.no_grad():
            found, report = refusal_report(
                model, study, n_train=opts.n_train, n_val=opts.n_val, n_test=opts.n_test,
                seed=config.seed, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size,
                generate=opts.generate, layers=opts.layers, kl_threshold=opts.kl_threshold,
                induce_threshold=opts.induce_threshold, prune_last=opts.prune_last,
                all_scores=opts.all_scores)
        scores = found.scores
        results = study.finish({
            "n_layers": model.cfg.n_layers,
            "report": report,
            "selection_scores": {"bypass": _nan_to_none(scores.bypass),
                                 "induce": _nan_to_none(scores.induce),
                                 "kl": _nan_to_none(scores.kl), "eligible": scores.eligible.tolist(),
                                 "rows": "post-instruction position -n_post ... -1",
                                 "columns": "layer (resid_pre); null: not evaluated (zero "
                                            "candidate, pruned layer, or a score that cannot "
                                            "change the choice; --all-scores computes all)"},
            "paper": {"source": "Arditi et al. 2024, Refusal in language models is mediated by a "
                                "single direction (arXiv 2406.11717)",
                      "finding": "in 13 chat models up to 72B, ablating one direction makes "
                                 "harmful requests mostly answered; adding it makes harmless ones "
                                 "refused"},
        })
    _print_table(results, config.model)
    return results


def _print_table(results: dict, model: str) -> None:
    report = results["report"]
    sel = report["selected"]
    print(f"\nRefusal direction on {model}: layer {sel['layer']} (resid_pre), position "
          f"{sel['position']}, passed filters: {sel['passed_filters']} "
          f"({report['n_eligible']} eligible candidates); validation KL {sel['kl']:.3f}, "
          f"bypass score {sel['bypass']:.2f}, induce score {sel['induce']:.2f}")
    if not sel["passed_filters"]:
        limit = report["settings"].get("kl_threshold")
        within = limit is None or sel["kl"] <= limit
        print("  NOTE: no candidate passed the filters; this direction is the fallback (lowest "
              "bypass score" + (" within the KL limit): the model may have no refusal direction "
                                "that works both ways" if within else
                                "; none is within the KL limit): its ablation may break the model "
                                "rather than remove refusal") + "; read the completions")
    rates = report.get("refusal_rate")
    print(f"{'test prompts':<18}{'refusal score':>14}" + (f"{'refused':>10}{'rate':>7}{'95% CI':>15}"
                                                          if rates else ""))
    for k in CONDITIONS:
        line = f"{k.replace('_', ' '):<18}{report['test_scores'][k]:>14.2f}"
        if rates:
            hit, n = report["refusal_count"][k]
            lo, hi = report["refusal_rate_ci95"][k]
            line += f"{hit:>6} / {n:<3}{rates[k]:>6.2f}   [{lo:.2f}, {hi:.2f}]"
        print(line)
    if rates:
        agree = {k: report["judges"][k]["rates"]["agreement"]["rate"] for k in CONDITIONS}
        print("phrase judge vs refusal score > 0, agreement: "
              + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in agree.items()))
        for k in CONDITIONS:
            example = report["examples"][k][0].replace("\n", " ")
            print(f"  {k}: {example[:110]!r}")
    t = results["timings_s"]
    print(f"time: {t['total']:.0f} s ({t['select']:.0f} s selection"
          + (f", {t['generate']:.0f} s generation" if "generate" in t else "") + ")")
