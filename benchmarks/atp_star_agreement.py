"""AtP vs AtP* vs exact patching on the sites AtP* was made for: heads' query, key and value
inputs (Kramar et al. 2024), and the residual stream with the fix over `qk_layers` layers,
through the pattern (the paper's QK fix) or through the head outputs (`resid_through`).

For each model: IOI pairs (ABC corruption, mixed templates, right-padded), exact patching as the
ground truth, AtP and AtP* on the same families; Pearson r (and Spearman, top-10 overlap) per
family, and each method's time in forward-pass units (median of `--repeats` runs, measured in
the same run as a plain forward pass of the batch). Writes
results/benchmarks/atp_star_agreement.json (one entry per model).

    python benchmarks/atp_star_agreement.py [--models smollm2-135m-instruct gemma-3-270m]
        [--n-pairs 8] [--by-pos] [--repeats 1] [--quick]
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
from interp.attribution.compare import agreement
from interp.attribution.patching import exact_patching
from interp.tasks import generate_ioi

QKV = ["q_input", "k_input", "v_input", "q_input_by_pos", "k_input_by_pos", "v_input_by_pos"]


def _timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _row(method, exact) -> dict:
    a = agreement(method, exact)
    return {"pearson": a.pearson, "spearman": a.spearman, "top10": a.top_k, "n_sites": a.n_sites}


#: resid variants: (resid_through, qk_layers)
RESID_VARIANTS = [("pattern", 1), ("pattern", None), ("head_output", 1), ("head_output", 4),
                  ("head_output", None)]


def run_model(name: str, n_pairs: int, variants: list[tuple[str, int | None]], repeats: int,
              families: list[str]) -> dict:
    model = models.load(name, device="cpu")
    pairs = generate_ioi(model, n_pairs)
    clean, corrupt = pairs.clean_tokens, pairs.corrupt_tokens
    metric = pairs.metric(model)

    def forward():
        with torch.no_grad():
            model(corrupt)

    forward()
    _, t_fwd = _timed(forward, max(repeats, 3))
    start = time.perf_counter()
    exact = exact_patching(model, clean, corrupt, metric, ["resid", *families], progress=False)
    t_exact = time.perf_counter() - start
    atp, t_atp = _timed(lambda: attribution_patching(model, clean, corrupt, metric,
                                                     ["resid", *families]), repeats)
    star, t_star = _timed(lambda: atp_star(model, clean, corrupt, metric, families), repeats)
    out = {"model": name, "n_pairs": len(pairs), "pos": clean.shape[1], "forward_s": t_fwd,
           "exact_s": t_exact, "exact_forward_passes": t_exact / t_fwd,
           "families": {}, "resid": {}}
    for fam in families:
        out["families"][fam] = {"atp": _row(atp[fam], exact[fam]),
                                "atp_star": _row(star[fam], exact[fam])}
    out["qkv_cost_forward_passes"] = {"atp": t_atp / t_fwd, "atp_star": t_star / t_fwd}
    out["resid"]["atp"] = {**_row(atp["resid"], exact["resid"]), "forward_passes": t_atp / t_fwd}
    best = None
    for through, depth in variants:
        scores, t = _timed(lambda depth=depth, through=through: atp_star(
            model, clean, corrupt, metric, ["resid"], qk_layers=depth, resid_through=through), repeats)
        key = f"atp_star_{through}_qk{'all' if depth is None else depth}"
        out["resid"][key] = {**_row(scores["resid"], exact["resid"]), "forward_passes": t / t_fwd,
                             "resid_through": through, "qk_layers": depth}
        if best is None or out["resid"][key]["pearson"] > out["resid"][best[0]]["pearson"]:
            best = (key, scores["resid"])
    # where the residual-stream error sits: the sites with the largest |AtP - exact|
    n_pos = exact["resid"].values.shape[1]
    err = (atp["resid"].values - exact["resid"].values).abs().flatten()
    out["resid_worst_sites_atp"] = [
        {"layer": int(i) // n_pos, "pos": int(i) % n_pos, "exact": float(exact["resid"].values.flatten()[i]),
         "atp": float(atp["resid"].values.flatten()[i]), best[0]: float(best[1].values.flatten()[i])}
        for i in torch.topk(err, 8).indices]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    parser.add_argument("--n-pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method (median)")
    parser.add_argument("--by-pos", action="store_true",
                        help="also the by-position q/k/v families (slow: pos x heads sites per layer)")
    parser.add_argument("--quick", action="store_true", help="2 pairs, 1 repeat")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/atp_star_agreement.json"))
    args = parser.parse_args()
    families = QKV if args.by_pos else QKV[:3]
    n_pairs, repeats = (2, 1) if args.quick else (args.n_pairs, args.repeats)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.models:
        row = run_model(name, n_pairs, RESID_VARIANTS, repeats, families)
        results[name] = row
        print(f"\n{name}: {row['n_pairs']} pairs, one forward {row['forward_s']:.3f} s, exact "
              f"{row['exact_s']:.0f} s")
        for fam, r in row["families"].items():
            print(f"  {fam:<16} Pearson AtP {r['atp']['pearson']:.3f}  AtP* {r['atp_star']['pearson']:.3f}"
                  f"   (top-10 {r['atp']['top10']:.1f} / {r['atp_star']['top10']:.1f})")
        for key, r in row["resid"].items():
            print(f"  resid {key:<28} Pearson {r['pearson']:.3f}  cost {r['forward_passes']:.1f} forwards")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
