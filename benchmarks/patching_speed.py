"""Our batched exact patching vs TransformerLens's `patching.py`, same sites, same prompt.

Default model, one IOI pair, all heads (summed over positions) and MLP output by position.
Both are timed in this run, each after an untimed warm-up call (a first call also pays for
allocating buffers and building kernels for new shapes; our cold time is printed too); results
must be equal (max |diff| printed). Goal: ratio >= 20x.
Writes results/benchmarks/patching_speed.json with `{"<family>": {"ratio": ...}}`.

    python benchmarks/patching_speed.py [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformer_lens import patching as tl_patching

from interp import models
from interp.attribution.metrics import LogitDiff
from interp.attribution.patching import exact_patching

TL = {"heads": tl_patching.get_act_patch_attn_head_out_all_pos,
      "mlp": tl_patching.get_act_patch_mlp_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/patching_speed.json"))
    args = parser.parse_args()
    model = models.load(args.model, device="cpu")
    clean = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupt = model.to_tokens("When Alice and Bob went to the store, Charlie gave a drink to")
    metric = LogitDiff(torch.tensor([model.to_single_token(" Mary")]),
                       torch.tensor([model.to_single_token(" John")])).normalised(model, clean, corrupt)
    _, clean_cache = model.run_with_cache(clean)
    rows = {}
    tl_metric = lambda logits: metric(logits).mean()  # noqa: E731
    with torch.no_grad():
        model(corrupt)  # TransformerLens's warm-up: one forward pass
    for family, tl_fn in TL.items():
        start = time.perf_counter()
        exact_patching(model, clean, corrupt, metric, [family], progress=False)  # warm-up
        t_cold = time.perf_counter() - start
        start = time.perf_counter()
        ours = exact_patching(model, clean, corrupt, metric, [family], progress=False)[family]
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            theirs = tl_fn(model, corrupt, clean_cache, tl_metric)
        t_tl = time.perf_counter() - start
        diff = ((ours.values + ours.baseline) - theirs).abs().max().item()
        rows[family] = {"sites": ours.values.numel(), "ours_s": t_ours, "ours_cold_s": t_cold,
                        "transformer_lens_s": t_tl, "ratio": t_tl / t_ours,
                        "ratio_cold": t_tl / t_cold, "max_abs_diff": diff, "goal_ratio": 20}
        print(f"{family:<6} {ours.values.numel():>5} sites  ours {t_ours:6.1f} s (cold {t_cold:.1f} s)  "
              f"TL {t_tl:7.1f} s  ratio {t_tl / t_ours:6.1f}x (cold {t_tl / t_cold:.1f}x)  "
              f"max|diff| {diff:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
