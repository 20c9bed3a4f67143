"""The refusal direction (Arditi et al. 2024, arXiv 2406.11717) of a chat model, and what it does.

A thin study around `interp.concepts.refusal.refusal_report`: difference-of-means candidates
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
`gemma-3-270m` stops with an error that says so. Cost on a CPU: selection runs two batched
forward passes over the validation prompts per candidate (6 positions x 24 layers on SmolLM2;
`--layers` restricts them), generation `4 x n_test` completions of `--max-new-tokens`. With
`--n-test 64` and the other defaults SmolLM2 took 46 min on a shared 2-core machine (37 min
selection, 7 min generation).

Measured on SmolLM2-135M-Instruct (seed 0, 64 train / 16 val / 64 test prompts of each kind, 48
tokens): it refuses 3 of 64 harmful test requests (0.05, 95% CI 0.02-0.13) and 1 of 64 harmless
ones. No candidate passes the filters (7 of 138 keep the KL <= 0.1, none raises the harmless
refusal score above 0), so the fallback (lowest bypass score) is taken: layer 2, position -4,
whose ablation has KL 11 on harmless prompts and turns every completion into gibberish (0 of 64
refusals, meaningless); adding it changes nothing (0 of 64 harmless refused). The model has no
refusal direction to speak of at this size.

Writes `results.json` (the report of `refusal_report`, with the per-prompt judgements and
completions, the selection scores of every candidate, the intervals, timings) and prints a table.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from interp import models
from interp.concepts.refusal import refusal_report
from interp.results import write_results
from interp.studies import StudyConfig, torch_threads

DESCRIPTION = ("Refusal direction (Arditi et al. 2024): find it on a chat model, then measure "
               "refusal rates of harmful prompts with it ablated and harmless ones with it added.")
CONDITIONS = ("harmful_clean", "harmful_ablated", "harmless_clean", "harmless_added")


def add_arguments(parser) -> None:
    parser.add_argument("--n-train", type=int, default=64,
                        help="harmful and harmless training instructions each (default 64)")
    parser.add_argument("--n-val", type=int, default=16,
                        help="validation instructions each, for selection (default 16)")
    parser.add_argument("--n-test", type=int, default=32,
                        help="test instructions each, for scores and rates (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="greedy completion length for the refusal rate (default 48)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="evaluate candidates at these layers only (default: all unpruned)")
    parser.add_argument("--kl-threshold", type=float, default=0.1)
    parser.add_argument("--induce-threshold", type=float, default=0.0)
    parser.add_argument("--prune-last", type=float, default=0.2)
    parser.add_argument("--no-generate", dest="generate", action="store_false",
                        help="refusal scores only, no completions (much faster)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for this run (default: torch's own choice)")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _nan_to_none(t: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else v for v in row] for row in t.tolist()]


def run(config: StudyConfig, n_train: int = 64, n_val: int = 16, n_test: int = 32,
        max_new_tokens: int = 48, layers: list[int] | None = None, kl_threshold: float = 0.1,
        induce_threshold: float = 0.0, prune_last: float = 0.2, generate: bool = True,
        batch_size: int = 16, threads: int | None = None) -> dict:
    if threads is not None:  # set for this run only
        with torch_threads(threads):
            return run(**dict(locals(), threads=None))
    torch.manual_seed(config.seed)
    out = config.out_dir("refusal-direction")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    model = models.load(config.model, device=config.device, dtype=config.dtype)
    t_load = time.perf_counter() - t_start
    with torch.no_grad():
        found, report = refusal_report(
            model, n_train=n_train, n_val=n_val, n_test=n_test, seed=config.seed,
            max_new_tokens=max_new_tokens, batch_size=batch_size, generate=generate,
            layers=layers, kl_threshold=kl_threshold, induce_threshold=induce_threshold,
            prune_last=prune_last)
    if generate:
        report["refusal_count"] = {k: [sum(v), len(v)] for k, v in report["refused"].items()}
        report["refusal_rate_ci95"] = {k: list(wilson(*c)) for k, c in report["refusal_count"].items()}
    scores = found.scores
    results = {
        "study": "refusal-direction",
        "config": config,
        "n_layers": model.cfg.n_layers,
        "report": report,
        "selection_scores": {"bypass": _nan_to_none(scores.bypass), "induce": _nan_to_none(scores.induce),
                             "kl": _nan_to_none(scores.kl), "eligible": scores.eligible.tolist(),
                             "rows": "post-instruction position -n_post ... -1",
                             "columns": "layer (resid_pre); null: not evaluated"},
        "paper": {"source": "Arditi et al. 2024, Refusal in language models is mediated by a "
                            "single direction (arXiv 2406.11717)",
                  "finding": "in 13 chat models up to 72B, ablating one direction makes harmful "
                             "requests mostly answered; adding it makes harmless ones refused"},
        "timings_s": {"load": t_load, **report["seconds"],
                      "total": time.perf_counter() - t_start,
                      "total_cpu": time.process_time() - cpu_start,
                      "threads": torch.get_num_threads()},
    }
    path = write_results(out, results)
    _print_table(results, config.model)
    print(f"wrote {path}")
    return results


def _print_table(results: dict, model: str) -> None:
    report = results["report"]
    sel = report["selected"]
    print(f"\nRefusal direction on {model}: layer {sel['layer']} (resid_pre), position "
          f"{sel['position']}, passed filters: {sel['passed_filters']} "
          f"({report['n_eligible']} eligible candidates); validation KL {sel['kl']:.3f}, "
          f"bypass score {sel['bypass']:.2f}, induce score {sel['induce']:.2f}")
    if not sel["passed_filters"]:
        print("  NOTE: no candidate passed the filters; this direction is the fallback (lowest "
              "bypass score), and with a large KL its ablation breaks the model rather than removing "
              "refusal: read the completions")
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
        for k in CONDITIONS:
            example = report["examples"][k][0].replace("\n", " ")
            print(f"  {k}: {example[:110]!r}")
    t = results["timings_s"]
    print(f"time: {t['total']:.0f} s ({t['select']:.0f} s selection"
          + (f", {t['generate']:.0f} s generation" if "generate" in t else "") + ")")
