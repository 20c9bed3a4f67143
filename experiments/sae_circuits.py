"""Study `sae-circuits`: sparse feature circuits for subject-verb agreement, RelP vs IG.

After Marks et al. (2024, "Sparse feature circuits") and the RelP paper's comparison with
integrated gradients (arXiv 2508.21258):

1. SAEs (TopK by default) at one kind of hook point in several layers, trained offline on the
   shared corpus with SAELens's runner from one shared activation cache, or loaded when a run
   with the same settings saved them before (`saes_dir()/<model>/<hook>/circuits-...`);
2. subject-verb agreement pairs from `interp.tasks.sva` (one template, so positions align):
   clean "The author near the dogs" (-> " is"), corrupt "The authors near the dogs";
3. every latent and error node at every position scored by RelP, by integrated gradients along
   each SAE's own activations (Marks et al.'s IG, `steps` points) and by AtP, all for patching
   the corrupt activation into the clean run (`direction="noise"`, the node's indirect effect);
4. faithfulness `(m(C) - m(empty)) / (m(M) - m(empty))` of the top-n nodes of each method, with
   the nodes outside the circuit mean-ablated (means over clean and corrupt prompts);
5. the cost of each method, the ratio IG / RelP, and the agreement of their node rankings;
6. HTML pages of the latents that RelP ranks highest, from held-out corpus text.

Writes `results/sae-circuits/<model>/results.json`, `faithfulness.{html,png}` and
`features/<hook>/index.html`. Scores are saved per method as they finish, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from interp import models, plots
from interp.attribution.atp import attribution_patching
from interp.attribution.compare import pearson, spearman, top_k_overlap
from interp.attribution.ig import integrated_gradients
from interp.attribution.relp import relp
from interp.hooks import hook_names
from interp.results import write_results
from interp.saes import (
    attach,
    corpus_contexts,
    inspect_features,
    train_or_load,
    write_feature_pages,
)
from interp.saes.circuits import ablation_means, faithfulness_curve, latent_families
from interp.studies import StudyConfig, StudyInputError, check_minimum
from interp.tasks.sva import TEMPLATES, generate_sva

DESCRIPTION = ("Sparse feature circuits on subject-verb agreement (Marks et al. 2024): SAEs at "
               "several layers, latents ranked by RelP and integrated gradients, faithfulness "
               "curves, cost and ranking agreement, feature pages.")

COUNTS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


def add_arguments(parser) -> None:
    parser.add_argument("--layers", default=None,
                        help="comma-separated layers with SAEs (default: 4 evenly spaced)")
    parser.add_argument("--hook", default="hook_resid_pre",
                        help="block hook point carrying the SAEs (default hook_resid_pre)")
    parser.add_argument("--architecture", default="topk")
    parser.add_argument("--k", type=int, default=32, help="TopK k (default 32)")
    parser.add_argument("--expansion", type=int, default=4, help="d_sae / d_in (default 4)")
    parser.add_argument("--n-tokens", type=int, default=60_000,
                        help="distinct corpus tokens per SAE (default 60k)")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--eval-tokens", type=int, default=4096,
                        help="held-out tokens for the SAE quality numbers")
    parser.add_argument("--n-pairs", type=int, default=32)
    parser.add_argument("--template", type=int, default=1,
                        help=f"SVA template id (default 1, {TEMPLATES[1]!r})")
    parser.add_argument("--ig-steps", type=int, default=10)
    parser.add_argument("--n-pages", type=int, default=8, help="feature pages to write")


def run(config: StudyConfig, layers: str | None = None, hook: str = "hook_resid_pre",
        architecture: str = "topk", k: int = 32, expansion: int = 4, n_tokens: int = 60_000,
        epochs: float = 4.0, eval_tokens: int = 4096, n_pairs: int = 32, template: int = 1,
        ig_steps: int = 10, n_pages: int = 8) -> dict:
    for name, value, minimum in (("k", k, 1), ("expansion", expansion, 1), ("n_tokens", n_tokens, 1),
                                 ("eval_tokens", eval_tokens, 2), ("n_pairs", n_pairs, 1),
                                 ("ig_steps", ig_steps, 1), ("n_pages", n_pages, 0)):
        check_minimum(name, value, minimum)
    if not epochs > 0:
        raise StudyInputError(f"epochs must be > 0, got {epochs} (--epochs)")
    if not 0 <= template < len(TEMPLATES):
        raise StudyInputError(f"template {template} does not exist: SVA template ids are "
                              f"0..{len(TEMPLATES) - 1} (--template)")
    try:
        layer_list = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise StudyInputError(f"--layers takes comma-separated layer numbers such as 2,4; got "
                              f"{layers!r}") from None
    torch.manual_seed(config.seed)
    out = config.out_dir("sae-circuits")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = models.load(config.model, device=config.device, dtype=config.dtype)
    timings["load"] = time.perf_counter() - t0
    n_layers = model.cfg.n_layers
    layer_list = layer_list or sorted({round(n_layers * (i + 1) / 5) for i in range(4)} - {n_layers})
    bad = [layer for layer in layer_list if not 0 <= layer < n_layers]
    if bad:
        raise StudyInputError(f"layers {bad} out of range: {config.model} has {n_layers} layers "
                              f"(--layers takes 0..{n_layers - 1})")
    hooks = [f"blocks.{layer}.{hook}" for layer in layer_list]
    try:
        hook_names(model, hooks, layers=None)
    except ValueError as exc:  # names the hook point and the close matches
        raise StudyInputError(f"--hook {hook!r}: {exc}") from exc
    train_args = dict(architecture=architecture, k=k, expansion=expansion, n_tokens=n_tokens,
                      epochs=epochs, eval_tokens=eval_tokens, seed=config.seed)
    t0 = time.perf_counter()
    saes, quality = train_or_load(model, hooks, prefix="circuits", **train_args)
    timings["saes"] = time.perf_counter() - t0

    pairs = generate_sva(model, n_pairs, seed=config.seed, templates=[template])
    clean, corrupt = pairs.clean_tokens, pairs.corrupt_tokens
    metric = pairs.metric(model)
    settings = {"model": config.model, "seed": config.seed, "hooks": hooks, **train_args,
                "n_pairs": len(pairs), "template": TEMPLATES[template], "ig_steps": ig_steps,
                "direction": "noise", "ablation": "mean over clean and corrupt prompts"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    score_dir = out / "scores" / key
    score_dir.mkdir(parents=True, exist_ok=True)

    with attach(model, saes):
        fams = latent_families(model)
        methods = {
            "relp": lambda: relp(model, clean, corrupt, metric, fams, direction="noise"),
            "ig": lambda: integrated_gradients(model, clean, corrupt, metric, fams, "noise",
                                               steps=ig_steps, path="activations"),
            "atp": lambda: attribution_patching(model, clean, corrupt, metric, fams, "noise"),
        }
        # untimed warm-up (first-call allocations and kernel setup would be charged to RelP)
        attribution_patching(model, clean[:1], corrupt[:1], metric.select([0]), fams, "noise")
        scores = {}
        for name, compute in methods.items():
            path = score_dir / f"{name}.pt"
            if path.exists():
                scores[name] = torch.load(path, weights_only=False)
                print(f"{name}: loaded from {path}")
            else:
                t0 = time.perf_counter()
                result = compute()
                scores[name] = {"scores": result, "seconds": time.perf_counter() - t0}
                torch.save(scores[name], path.with_suffix(".tmp"))  # a kill leaves no half file
                path.with_suffix(".tmp").replace(path)
            timings[name] = scores[name]["seconds"]
            print(f"{name}: {timings[name]:.1f} s")
        means = ablation_means(model, torch.cat([clean, corrupt]), fams)
        n_nodes = _n_nodes(scores["relp"]["scores"])  # the same nodes for every method
        counts = [c for c in COUNTS if c < n_nodes] + [n_nodes]
        curves = {name: faithfulness_curve(model, clean, metric, scores[name]["scores"], fams,
                                           counts, means) for name in methods}
        top = _top_nodes(scores, fams, model, clean, n=20)

    agreement = _agreement(scores["relp"]["scores"], scores["ig"]["scores"])
    figures = plots.save_figure(
        plots.lines(curves["relp"].counts[1:],  # n = 0 (faithfulness 0) has no place on a log axis
                    {m: c.faithfulness[1:] for m, c in curves.items()},
                    f"Faithfulness of top-n SAE nodes, SVA ({config.model})",
                    "nodes kept (log scale)", "faithfulness").update_xaxes(type="log"),
        out / "faithfulness")
    t0 = time.perf_counter()
    pages = _pages(model, saes, top, out / "features", n_pages, config.seed)
    timings["pages"] = time.perf_counter() - t0
    results = {
        "study": "sae-circuits",
        "config": config,
        "settings": settings,
        "sae_quality": quality,
        "pairs": {"n": len(pairs), "examples": pairs.clean_texts[:3],
                  "corrupt_examples": pairs.corrupt_texts[:3]},
        "logit_diff": {"clean": metric.clean, "corrupt": metric.corrupt},
        "faithfulness": {m: c.to_dict() for m, c in curves.items()},
        "cost_s": {m: timings[m] for m in methods},
        "cost_ratio_ig_over_relp": timings["ig"] / timings["relp"],
        # wall times swing with other load on a shared CPU; the pass counts do not
        "cost_passes": {"relp": "2 forward + 1 backward over the pairs",
                        "atp": "2 forward + 1 backward over the pairs",
                        "ig": f"2 forward + {len(hooks)} x (1 forward + 1 backward) over "
                              f"{ig_steps} x the pairs"},
        "ranking_agreement_relp_vs_ig": agreement,
        "top_nodes_relp": top,
        "feature_pages": pages,
        "paper": {"source": "RelP, arXiv 2508.21258, after Marks et al. 2024",
                  "finding": "RelP circuits are at least as faithful as IG circuits at the "
                             "cost of one forward and one backward pass"},
        "timings_s": timings,
        "figures": [f.name for f in figures],
    }
    path = write_results(out, results)
    _print(results)
    print(f"wrote {path}")
    return results


def _n_nodes(scores: dict) -> int:
    return sum(s.values.numel() for s in scores.values())


def _flat(scores: dict) -> torch.Tensor:
    return torch.cat([scores[f].flat() for f in sorted(scores)])


def _agreement(a: dict, b: dict) -> dict:
    x, y = _flat(a), _flat(b)
    live = (x != 0) | (y != 0)  # nodes at skipped positions score 0 for every method
    return {"n_nodes": len(x), "n_nonzero": int(live.sum()), "pearson": pearson(x[live], y[live]),
            "spearman": spearman(x[live], y[live]),
            **{f"top_{k}_overlap": top_k_overlap(x, y, k) for k in (10, 100, 1000)}}


def _top_nodes(scores: dict, fams, model, tokens, n: int) -> list[dict]:
    """The `n` nodes with the largest |RelP| score, with IG's and AtP's score for each."""
    relp_scores = scores["relp"]["scores"]
    rows = []
    for fam in fams:
        s = relp_scores[fam.name]
        for flat_index in torch.topk(s.flat().abs(), min(n, s.values.numel())).indices.tolist():
            index = list(torch.unravel_index(torch.tensor(flat_index), s.values.shape))
            layer, pos = fam.layer_list(model)[int(index[0])], int(index[1])
            rows.append({
                "family": fam.name, "hook": fam.hook_name(layer).rsplit(".hook_sae_", 1)[0],
                "layer": layer, "pos": pos,
                "token": model.to_string(tokens[0, pos : pos + 1]) if model.tokenizer else str(pos),
                "latent": int(index[2]) if len(index) > 2 else None,
                **{m: float(scores[m]["scores"][fam.name].values[tuple(index)]) for m in scores},
            })
    rows.sort(key=lambda r: -abs(r["relp"]))
    return rows[:n]


def _pages(model, saes: dict, top: list[dict], out: Path, n_pages: int, seed: int) -> dict:
    """Feature pages (held-out corpus contexts, density, logit lens) for the top latents."""
    held = corpus_contexts(model, "heldout", context_size=64, n_tokens=8192, seed=seed)
    chosen: dict[str, list[int]] = {}
    for row in top:
        if row["latent"] is not None and sum(map(len, chosen.values())) < n_pages:
            if row["latent"] not in chosen.setdefault(row["hook"], []):
                chosen[row["hook"]].append(row["latent"])
    written = {}
    for hook_name, latents in chosen.items():
        reports, stats = inspect_features(model, saes[hook_name], hook_name, held, latents, k=8)
        index = write_feature_pages(out / hook_name, reports, stats=stats,
                                    title=f"SVA circuit latents at {hook_name}")
        written[hook_name] = {"latents": latents, "index": str(index)}
    return written


def _print(results: dict) -> None:
    print("\nSAE quality (held-out): " + "; ".join(
        f"{h}: fve {q['quality']['fve_typical']:.3f}, CE rec {q['quality']['ce_loss_recovered']:.3f}"
        for h, q in results["sae_quality"].items() if q.get("quality")))
    print(f"logit diff clean {results['logit_diff']['clean']:.3f}, "
          f"corrupt {results['logit_diff']['corrupt']:.3f}")
    curves = results["faithfulness"]
    print(f"{'nodes':>8}" + "".join(f"{m:>10}" for m in curves))
    for i, n in enumerate(curves["relp"]["counts"]):
        print(f"{n:>8}" + "".join(f"{c['faithfulness'][i]:>10.3f}" for c in curves.values()))
    print("cost (s): " + ", ".join(f"{m} {s:.1f}" for m, s in results["cost_s"].items())
          + f"; IG / RelP = {results['cost_ratio_ig_over_relp']:.1f}")
    a = results["ranking_agreement_relp_vs_ig"]
    print(f"RelP vs IG rankings: spearman {a['spearman']:.3f}, pearson {a['pearson']:.3f}, "
          f"top-100 overlap {a['top_100_overlap']:.2f}")
