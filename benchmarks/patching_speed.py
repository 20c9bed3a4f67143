"""Our batched exact patching vs TransformerLens's `patching.py`, and batched exact edge patching
vs a naive one-edge-at-a-time hooked loop; same sites, same IOI pairs, measured side by side.

**Node patching.** For each batch size (`--pairs`, default 1, 8 and 32 IOI pairs, ABC
corruption, mixed templates) and family (`resid`, `heads`, `mlp`), our `exact_patching` over
every site of the family against TransformerLens's `generic_activation_patch`, which runs one
full forward pass per site. Each side is timed `--repeats` times (default 3) after an untimed
warm-up and the median is reported. TransformerLens runs a seeded random sample of
`--tl-sites` sites per family (0: all of them); since it costs one forward pass per site, its
time for the whole family is the sample's time scaled by `n_sites / sample` (the per-site
cost is the same for every site: one full forward pass of the batch). Ratio = TransformerLens
(whole family) / ours.

**Edge patching.** `exact_edge_patching` on a seeded sample of `--edges` edges of the SmolLM2
graph (every sender and receiver kind: input, heads, MLPs, logits) against a loop that patches
one edge per forward pass with plain TransformerLens hooks: the sender's output difference
(`z @ W_O` of a head, `mlp_out`, or the embeddings), taken from `run_with_cache` of both runs,
added to the receiver's input (its q, k and v input copies for a head, `hook_mlp_in`, or the
final residual stream for the logits). Same timing protocol, at `--edge-pairs` batch sizes.

Every result is checked: our values must equal the reference's to `--atol` (max |diff|
printed); the script exits with status 1 if any differs. The machine's load (other jobs) is
recorded with the numbers (`os.getloadavg`): ratios are measured in the same run, absolute
times are not comparable across runs.

Writes results/benchmarks/patching_speed.json.

    python benchmarks/patching_speed.py [--model smollm2-135m-instruct] [--pairs 1 8 32]
        [--families resid heads mlp] [--repeats 3] [--tl-sites 64] [--edges 48] [--quick]

`--quick`: 1 and 8 pairs, `heads` only, 24 TransformerLens sites, 16 edges at 1 pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import HookedTransformer
from transformer_lens import patching as tl_patching

from interp import models
from interp.attribution.edges import exact_edge_patching
from interp.attribution.graph import Graph
from interp.attribution.patching import exact_patching
from interp.tasks import generate_ioi

#: family -> (TransformerLens activation name, patch setter, index axes)
TL = {
    "resid": ("resid_pre", tl_patching.layer_pos_patch_setter, ("layer", "pos")),
    "heads": ("z", tl_patching.layer_head_vector_patch_setter, ("layer", "head")),
    "mlp": ("mlp_out", tl_patching.layer_pos_patch_setter, ("layer", "pos")),
}


def median_time(fn, repeats: int) -> tuple[object, float, list[float]]:
    """`fn()`'s last result, the median and all of `repeats` wall-clock times."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times), times


def node_rows(model: HookedTransformer, n_pairs: int, families: list[str], repeats: int,
              tl_sites: int, atol: float, seed: int) -> dict:
    pairs = generate_ioi(model, n_pairs, seed=seed)
    clean, corrupt = pairs.clean_tokens, pairs.corrupt_tokens
    metric = pairs.metric(model)
    tl_metric = lambda logits: metric(logits).mean()  # noqa: E731
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        model(corrupt)  # TransformerLens's warm-up: one forward pass
    rows = {}
    for family in families:
        exact_patching(model, clean, corrupt, metric, [family], progress=False)  # warm-up
        ours, t_ours, times_ours = median_time(
            lambda family=family: exact_patching(model, clean, corrupt, metric, [family],
                                                 progress=False)[family],
            repeats)
        values = ours.values + ours.baseline  # the patched metric itself, as TL reports it
        name, setter, axes = TL[family]
        index = torch.cartesian_prod(*[torch.arange(n) for n in values.shape]).view(-1, values.ndim)
        if tl_sites and tl_sites < len(index):
            gen = torch.Generator().manual_seed(seed)
            index = index[torch.randperm(len(index), generator=gen)[:tl_sites]]
        frame = pd.DataFrame(index.numpy(), columns=list(axes))
        with torch.no_grad():
            theirs, t_tl_sample, times_tl = median_time(
                lambda setter=setter, name=name, frame=frame: tl_patching.generic_activation_patch(
                    model, corrupt, clean_cache, tl_metric, patch_setter=setter,
                    activation_name=name, index_df=frame), repeats)
        mine = values[tuple(index.T)]
        diff = (mine - theirs.cpu()).abs().max().item()
        n_sites = values.numel()
        t_tl = t_tl_sample * n_sites / len(index)
        rows[family] = {
            "sites": n_sites, "tl_sites_run": len(index), "ours_s": t_ours, "ours_runs_s": times_ours,
            "transformer_lens_s": t_tl, "transformer_lens_sample_s": t_tl_sample,
            "transformer_lens_runs_s": times_tl, "ratio": t_tl / t_ours, "max_abs_diff": diff,
            "equal": diff <= atol,
        }
        print(f"  {n_pairs:>2} pairs {family:<6} {n_sites:>5} sites  ours {t_ours:7.2f} s  TL "
              f"{t_tl:8.1f} s ({len(index)} run)  ratio {t_tl / t_ours:6.1f}x  max|diff| {diff:.1e}",
              flush=True)
    return rows


def naive_edge_patching(model: HookedTransformer, graph: Graph, clean, corrupt, metric,
                        ids: torch.Tensor) -> torch.Tensor:
    """One forward pass per edge with plain TransformerLens hooks (see the module notes)."""
    cfg = model.cfg
    _, src = model.run_with_cache(clean)
    _, tgt = model.run_with_cache(corrupt)
    baseline = metric(model(corrupt)).mean()

    def out_diff(node) -> torch.Tensor:
        if node.kind == "input":
            name = "blocks.0.hook_resid_pre"
            return src[name] - tgt[name]
        if node.kind == "mlp":
            name = f"blocks.{node.layer}.hook_mlp_out"
            return src[name] - tgt[name]
        name = f"blocks.{node.layer}.attn.hook_z"
        dz = src[name][:, :, node.head] - tgt[name][:, :, node.head]
        return dz @ model.blocks[node.layer].attn.W_O[node.head]

    values = []
    saved = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in, cfg.ungroup_grouped_query_attention)
    try:
        cfg.use_split_qkv_input, cfg.use_hook_mlp_in = True, True
        cfg.ungroup_grouped_query_attention = cfg.n_key_value_heads is not None
        for edge in [graph.edge(int(i)) for i in ids]:
            delta = out_diff(edge.sender)
            receiver = edge.receiver

            def add(act, hook, delta=delta, head=receiver.node.head):
                act = act.clone()
                if head is None:
                    return act + delta
                act[:, :, head] += delta
                return act

            hooks = [(name, add) for name in receiver.hook_names(cfg.n_layers)]
            logits = model.run_with_hooks(corrupt, fwd_hooks=hooks)
            values.append((metric(logits).mean() - baseline).item())
    finally:
        cfg.use_split_qkv_input, cfg.use_hook_mlp_in, cfg.ungroup_grouped_query_attention = saved
    return torch.tensor(values)


def edge_rows(model: HookedTransformer, n_pairs: int, n_edges: int, repeats: int, atol: float,
              seed: int) -> dict:
    pairs = generate_ioi(model, n_pairs, seed=seed)
    clean, corrupt = pairs.clean_tokens, pairs.corrupt_tokens
    metric = pairs.metric(model)
    graph = Graph.from_model(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(graph.n_edges, generator=gen)[:n_edges].sort().values
    run = lambda: exact_edge_patching(model, clean, corrupt, metric, graph, edges=ids.tolist(),  # noqa: E731
                                      progress=False)
    run()  # warm-up
    ours, t_ours, times_ours = median_time(run, repeats)
    with torch.no_grad():
        theirs, t_naive, times_naive = median_time(
            lambda: naive_edge_patching(model, graph, clean, corrupt, metric, ids), repeats)
    order = torch.argsort(ours.ids)
    diff = (ours.values[order] - theirs).abs().max().item()
    print(f"  {n_pairs:>2} pairs edges  {n_edges:>5} edges  ours {t_ours:7.2f} s  naive {t_naive:8.1f} s  "
          f"ratio {t_naive / t_ours:6.1f}x  max|diff| {diff:.1e}", flush=True)
    return {"edges": n_edges, "ours_s": t_ours, "ours_runs_s": times_ours, "naive_s": t_naive,
            "naive_runs_s": times_naive, "ratio": t_naive / t_ours, "max_abs_diff": diff,
            "equal": diff <= atol}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--pairs", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--families", nargs="+", default=list(TL), choices=list(TL))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tl-sites", type=int, default=64,
                        help="TransformerLens sites run per family (0: all), time scaled to all")
    parser.add_argument("--edges", type=int, default=48)
    parser.add_argument("--edge-pairs", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=__doc__.split("`--quick`: ")[1].strip())
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/patching_speed.json"))
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.families, args.tl_sites = [1, 8], ["heads"], 24
        args.edges, args.edge_pairs = 16, [1]
    model = models.load(args.model, device="cpu")
    result = {"model": args.model, "torch_threads": torch.get_num_threads(),
              "load_average_start": os.getloadavg(), "repeats": args.repeats,
              "tl_sites": args.tl_sites, "atol": args.atol, "nodes": {}, "edges_vs_naive": {}}
    print(f"{args.model}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    for n in args.pairs:
        result["nodes"][str(n)] = node_rows(model, n, args.families, args.repeats, args.tl_sites,
                                            args.atol, args.seed)
    for n in args.edge_pairs:
        result["edges_vs_naive"][str(n)] = edge_rows(model, n, args.edges, args.repeats, args.atol,
                                                     args.seed)
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"load average at the end {os.getloadavg()}; wrote {args.out}")
    unequal = [f"{n} pairs {fam}" for n, rows in result["nodes"].items() for fam, r in rows.items()
               if not r["equal"]]
    unequal += [f"edges at {n} pairs" for n, r in result["edges_vs_naive"].items() if not r["equal"]]
    if unequal:
        print(f"FAILED: results differ beyond atol {args.atol}: {', '.join(unequal)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
