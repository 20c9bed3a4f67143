"""Refusal-direction selection: `select_direction` vs the plain per-candidate loop it replaced.

The reference scores every candidate the straightforward way: for each candidate, left-padded
`next_token_logits` over the validation prompts with the ablation hooks (bypass and KL) and with
the addition hook (induce), TransformerLens's weight layout as it is. Ours shares the prompts'
common chat prefix through a KV cache (`SharedPrefix`) and runs inside
`inference_layout`. Both are timed in this run on the same candidates (interleaved, median of
`--repeats`), and their score tables must agree (max |diff| printed; non-zero exit otherwise).
Then the default selection is timed once with every score and once scoring only the candidates
that can decide it (`select_direction`'s default); the two must choose the same candidate.
Writes results/benchmarks/refusal_selection.json.

    python benchmarks/refusal_selection.py [--layers 4 8] [--n-val 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from interp import hooks, models
from interp.concepts import refusal
from interp.generation import next_token_logits


def reference_scores(model, candidates, layers, harmful, harmless, tokens, batch_size):
    """bypass, kl, induce of each candidate, one plain forward pass per condition."""
    both = harmful + harmless
    clean = next_token_logits(model, harmless, batch_size=batch_size).double().log_softmax(-1)
    out = {}
    for i in range(candidates.shape[0]):
        for layer in layers:
            r = candidates[i, layer]
            ablated = next_token_logits(model, both, hooks.ablate_direction(model, r),
                                        batch_size=batch_size)
            added = next_token_logits(model, harmless, hooks.steer(model, r, layers=[layer]),
                                      batch_size=batch_size)
            q = ablated[len(harmful):].double().log_softmax(-1)
            out[i, layer] = (
                refusal.refusal_log_odds(ablated[:len(harmful)], tokens).mean().item(),
                (clean.exp() * (clean - q)).sum(-1).mean().item(),
                refusal.refusal_log_odds(added, tokens).mean().item())
    return out


def ours(model, candidates, layers, harmful, harmless, tokens, batch_size):
    found = refusal.select_direction(model, candidates, harmful, harmless, tokens,
                                     kl_threshold=None, induce_threshold=None, prune_last=0,
                                     layers=layers, batch_size=batch_size, all_scores=True)
    s = found.scores
    return {(i, layer): (s.bypass[i, layer].item(), s.kl[i, layer].item(),
                         s.induce[i, layer].item())
            for i in range(candidates.shape[0]) for layer in layers}


def choice(model, candidates, layers, harmful, harmless, tokens, batch_size, all_scores):
    """The selection with the default filters: every score, or only those that can decide."""
    found = refusal.select_direction(model, candidates, harmful, harmless, tokens, prune_last=0,
                                     layers=layers, batch_size=batch_size, all_scores=all_scores)
    return found.position, found.layer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/refusal_selection.json"))
    args = parser.parse_args()
    model = models.load(args.model, device="cpu")
    tokens = refusal.refusal_token_ids(model)
    n_post = len(refusal.post_instruction_tokens(model))
    data = {(kind, split): refusal.format_prompts(model, refusal.load_instructions(kind, split, n, 0))
            for kind in ("harmful", "harmless") for split, n in (("train", args.n_train),
                                                                 ("val", args.n_val))}
    candidates = refusal.candidate_directions(model, data["harmful", "train"],
                                              data["harmless", "train"], n_post)
    call = (model, candidates, args.layers, data["harmful", "val"], data["harmless", "val"],
            tokens, args.batch_size)
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    results = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in (("reference", reference_scores), ("ours", ours)):
                start = time.perf_counter()
                results[name] = fn(*call)
                times[name].append(time.perf_counter() - start)
        # the default selection: scoring only what can decide it must choose the same
        choices = {}
        for lazy in (False, True):
            start = time.perf_counter()
            choices[lazy] = choice(*call, all_scores=not lazy)
            times["choice_lazy" if lazy else "choice_all"] = [time.perf_counter() - start]
    diff = max(abs(a - b) for key in results["ours"]
               for a, b in zip(results["ours"][key], results["reference"][key]))
    t_ref, t_ours = statistics.median(times["reference"]), statistics.median(times["ours"])
    t_all, t_lazy = times["choice_all"][0], times["choice_lazy"][0]
    row = {"candidates": len(results["ours"]), "prompts": 2 * args.n_val + args.n_val,
           "reference_s": t_ref, "ours_s": t_ours, "ratio": t_ref / t_ours,
           "choice_all_scores_s": t_all, "choice_needed_scores_s": t_lazy,
           "choice": list(choices[True]), "same_choice": choices[True] == choices[False],
           "all_times_s": times, "max_abs_diff": diff,
           "prefix_tokens": refusal.common_prefix_length(
               data["harmful", "val"] + data["harmless", "val"]),
           "threads": torch.get_num_threads()}
    print(f"{row['candidates']} candidates: reference {t_ref:.1f} s, ours {t_ours:.1f} s, "
          f"ratio {row['ratio']:.2f}x, max |diff| of bypass/kl/induce {diff:.1e}")
    print(f"default selection: every score {t_all:.1f} s, only the deciding ones {t_lazy:.1f} s "
          f"({t_all / t_lazy:.2f}x), same choice: {row['same_choice']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2))
    print(f"wrote {args.out}")
    return 0 if diff < 1e-3 and row["same_choice"] else 1


if __name__ == "__main__":
    sys.exit(main())
