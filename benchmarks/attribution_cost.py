"""Cost of AtP and RelP for all site families, in units of one forward pass, same run.

Default model, a batch of IOI pairs. Goal: <= 4 forward passes each (two forwards and one
backward). Writes results/benchmarks/attribution_cost.json.

    python benchmarks/attribution_cost.py [--model smollm2-135m-instruct] [--n-pairs 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from interp import models
from interp.attribution.atp import attribution_patching
from interp.attribution.atp_star import atp_star
from interp.attribution.relp import relp
from interp.tasks import generate_ioi

FAMILIES = ["resid", "attn", "mlp", "heads"]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--n-pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/attribution_cost.json"))
    args = parser.parse_args()
    model = models.load(args.model, device="cpu")
    group = generate_ioi(model, args.n_pairs)  # right-padded; the metric reads each end_pos
    clean, corrupt = group.clean_tokens, group.corrupt_tokens
    metric = group.metric(model)

    def forward():
        with torch.no_grad():
            model(corrupt)

    forward()  # warm up
    t_fwd = _median_time(forward, args.repeats)
    t_atp = _median_time(lambda: attribution_patching(model, clean, corrupt, metric, FAMILIES), args.repeats)
    t_relp = _median_time(lambda: relp(model, clean, corrupt, metric, FAMILIES), args.repeats)
    t_star = _median_time(lambda: atp_star(model, clean, corrupt, metric, FAMILIES), args.repeats)
    rows = {"forward_s": t_fwd, "batch": len(group), "families": FAMILIES,
            "atp": {"seconds": t_atp, "forward_passes": t_atp / t_fwd},
            "relp": {"seconds": t_relp, "forward_passes": t_relp / t_fwd},
            "atp_star": {"seconds": t_star, "forward_passes": t_star / t_fwd}, "goal_forward_passes": 4}
    print(f"one forward {t_fwd:.3f} s (batch {len(group)}); AtP {t_atp:.3f} s = {t_atp / t_fwd:.1f} "
          f"forwards; RelP {t_relp:.3f} s = {t_relp / t_fwd:.1f} forwards (goal <= 4); "
          f"AtP* {t_star:.3f} s = {t_star / t_fwd:.1f} forwards")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
