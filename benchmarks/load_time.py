"""First load (dequantise GGUF + convert + process) vs cached load, per embedded model.

Both are measured in this run, in a fresh temporary cache directory, so the ratio compares like
with like. Goal: a cached load takes <= 3 s. Writes results/benchmarks/load_time.json.

    python benchmarks/load_time.py [--models smollm2-135m-instruct gemma-3-270m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

GOAL_CACHED_S = 3.0


def measure(name: str, repeats: int) -> dict:
    from interp import models

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["INTERP_CACHE_DIR"] = tmp
        start = time.perf_counter()
        models.load(name, device="cpu")
        first = time.perf_counter() - start
        cached = []
        for _ in range(repeats):
            start = time.perf_counter()
            models.load(name, device="cpu")
            cached.append(time.perf_counter() - start)
    median = statistics.median(cached)
    return {"first_load_s": first, "cached_load_s": cached, "cached_median_s": median,
            "speedup": first / median, "goal_cached_s": GOAL_CACHED_S,
            "meets_goal": median <= GOAL_CACHED_S}


def main() -> None:
    from interp import models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(models.EMBEDDED_MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/load_time.json"))
    args = parser.parse_args()
    previous = os.environ.get("INTERP_CACHE_DIR")
    rows = {}
    for name in args.models:
        rows[name] = measure(name, args.repeats)
    if previous is not None:
        os.environ["INTERP_CACHE_DIR"] = previous
    print(f"{'model':<24}{'first load':>12}{'cached (median)':>17}{'ratio':>8}  goal <= {GOAL_CACHED_S:.0f} s")
    for name, r in rows.items():
        print(f"{name:<24}{r['first_load_s']:>11.1f}s{r['cached_median_s']:>16.2f}s"
              f"{r['speedup']:>7.0f}x  {'met' if r['meets_goal'] else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
