"""Study `ioi-circuit`: edge-level IOI circuits by EAP, EAP-IG and RelP (issue 11, section 5).

On IOI prompt pairs (`interp.tasks.generate_ioi`, ABC corruption, the normalised logit
difference: clean 1, corrupt 0):

1. every edge of the model's graph (`Graph.from_model`: input, heads, MLPs, logits) is scored
   by EAP, EAP-IG (inputs, `ig_steps` points) and RelP on edges, for patching clean sender
   outputs into the corrupt run (`direction="denoise"`);
2. exact edge patching scores the edges into the heads of the final `last_layers` layers and
   into the logits (or a seeded sample of them, `exact_sample`), and each method's agreement
   with it is Pearson r, Spearman rho and top-20 overlap (`interp.attribution.compare`), over
   all those edges and apart for edges into heads and into the logits;
3. each method's circuits (top edges, pruned, the rest patched to their corrupt values) give a
   faithfulness curve over MIB's edge fractions with CPR and CMD (MIB, arXiv 2504.13151:
   CPR for circuits ranked by signed score, CMD ranked by |score|);
4. the method with the lowest CMD gives the drawn circuit (its top `circuit_edges` edges by
   signed score, or by |score| when only that ranking ran; pruned), whose heads are named by role from their attention patterns on the clean prompts
   (`interp.tasks.ioi_roles`: name movers, S-inhibition, duplicate-token, induction).

Writes `results/ioi-circuit/<model>/results.json`, `circuit.{html,png}` (the drawn circuit),
`faithfulness.{html,png}` and `scatter_exact.{html,png}`, and prints the tables. Each method's
scores, its curves and the circuit are resume units (`StudyRun.cached`): an interrupted run
recomputes only what it had not saved.

`--quick`: 4 pairs, 2 IG steps, 400 sampled exact edges, 5 fractions, CMD ranking only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from interp import plots
from interp.attribution.circuits import MIB_FRACTIONS, edge_circuit_metric, faithfulness_curve, prune_edges, top_edges
from interp.attribution.compare import pearson, spearman, top_k_overlap
from interp.attribution.edges import eap, eap_ig, exact_edge_patching, relp_edges
from interp.attribution.graph import Graph
from interp.studies import StudyConfig, StudyInputError, StudyRun, option, options_parser
from interp.tasks import generate_ioi
from interp.tasks.ioi_roles import head_roles

DESCRIPTION = ("Edge-level IOI circuits: EAP, EAP-IG and RelP against exact edge patching, "
               "faithfulness curves with CPR/CMD, the best circuit drawn, heads by role.")

METHODS = ("eap", "eap_ig", "relp")
QUICK_FRACTIONS = (0.001, 0.01, 0.05, 0.2, 1.0)
TOP_K = 20

#: The RelP paper (arXiv 2508.21258) reports circuits only as sparse feature circuits on
#: subject-verb agreement (node faithfulness, RelP vs IG), no edge circuits on IOI.
PAPER_NOTE = ("RelP (arXiv 2508.21258) reports circuit faithfulness only for sparse feature "
              "circuits on subject-verb agreement (RelP vs IG); it has no edge-level IOI "
              "circuit, CPR or CMD to compare with.")


@dataclass
class Options:
    """The study's options (the command line is built from them)."""

    n_pairs: int = option(50, "IOI prompt pairs", minimum=1)
    quick: bool = option(False, "small setting: 4 pairs, 2 IG steps, 400 sampled exact edges, "
                                "5 fractions, CMD ranking only")
    corruption: str = option("abc", "IOI corruption", choices=("abc", "swap"))
    ig_steps: int = option(5, "EAP-IG interpolation points", minimum=1)
    last_layers: int = option(5, "exact edge patching on the edges into these final layers' heads "
                                 "(and the logits)", minimum=1)
    exact_sample: int | None = option(None, "patch a seeded sample of that many of those edges "
                                            "(default all)", minimum=1)
    fractions: Sequence[float] | None = option(None, "edge fractions of the faithfulness curves "
                                                     "(default MIB's)")
    rankings: Sequence[str] = option(("abs", "max"), "circuit rankings: abs (MIB's CMD), max "
                                                     "(signed, MIB's CPR)")
    circuit_edges: int = option(100, "edges of the drawn circuit (top edges of the best method, "
                                     "signed ranking where it ran, then pruned)", minimum=1)
    role_threshold: float = option(0.2, "mean attention weight that counts as attending (head roles)")
    memory_gb: float = option(2.0, "rough memory budget of one pass")


add_arguments = options_parser(Options)


def _settings(opts: Options) -> Options:
    """The options a `--quick` run really uses."""
    if not opts.quick:
        return opts
    return replace(opts, n_pairs=min(opts.n_pairs, 4), ig_steps=min(opts.ig_steps, 2),
                   exact_sample=opts.exact_sample or 400,
                   fractions=opts.fractions or QUICK_FRACTIONS, rankings=("abs",))


def run(config: StudyConfig, **options) -> dict:
    opts = _settings(Options(**options))
    bad = [r for r in opts.rankings if r not in ("abs", "max")]
    if bad:
        raise StudyInputError(f"rankings must be 'abs' or 'max', got {bad} (--rankings abs max)")
    fractions = tuple(MIB_FRACTIONS if opts.fractions is None else opts.fractions)
    if any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(fractions) or len(fractions) < 2:
        raise StudyInputError(f"fractions must be at least two increasing numbers in (0, 1], got "
                              f"{list(fractions)} (--fractions 0.01 0.1 1)")
    with StudyRun("ioi-circuit", config, opts, ignore=("memory_gb",)) as study:
        model = study.load_model()
        if opts.last_layers > model.cfg.n_layers:
            raise StudyInputError(f"last_layers is {opts.last_layers} but {config.model} has "
                                  f"{model.cfg.n_layers} layers (--last-layers)")
        pairs = generate_ioi(model, opts.n_pairs, seed=config.seed, corruption=opts.corruption)
        clean, corrupt = pairs.clean_tokens, pairs.corrupt_tokens
        metric = pairs.metric(model)
        graph = Graph.from_model(model)
        print(graph.summary())

        compute = {
            "eap": lambda: eap(model, clean, corrupt, metric, graph),
            "eap_ig": lambda: eap_ig(model, clean, corrupt, metric, graph, steps=opts.ig_steps,
                                     memory_gb=opts.memory_gb, method="eap_ig"),
            "relp": lambda: relp_edges(model, clean, corrupt, metric, graph),
        }
        first = model.cfg.n_layers - opts.last_layers
        receivers = [f"a{layer}.*" for layer in range(first, model.cfg.n_layers)] + ["logits"]
        n_chosen = len(graph.select(receiver=receivers))
        sample = opts.exact_sample if opts.exact_sample and opts.exact_sample < n_chosen else None
        compute["exact"] = lambda: exact_edge_patching(
            model, clean, corrupt, metric, graph, receivers=receivers, sample=sample,
            seed=config.seed, memory_gb=opts.memory_gb, progress=False)
        scores = {}
        for name, fn in compute.items():
            with study.timer(f"scores_{name}"):
                scores[name] = study.cached(f"scores/{name}", fn)
            print(f"{name}: {study.timings[f'scores_{name}']:.1f} s", flush=True)

        agreement = _agreement(scores, graph)
        curves = {}
        for name in METHODS:
            for by in opts.rankings:
                with study.timer(f"faithfulness_{name}"):
                    curves[(name, by)] = study.cached(f"faithfulness/{name}_{by}", lambda name=name, by=by: faithfulness_curve(
                        model, clean, corrupt, metric, scores[name], fractions=fractions,
                        selection="pruned", by=by, memory_gb=opts.memory_gb).to_dict())
        summary = {name: _summary(curves, name, opts.rankings) for name in METHODS}
        best = min(METHODS, key=lambda m: summary[m]["cmd"])

        draw_by = "max" if "max" in opts.rankings else "abs"  # signed: edges that help

        def circuit() -> dict:
            n = min(opts.circuit_edges, graph.n_edges)
            keep = prune_edges(graph, top_edges(scores[best], n, by=draw_by))
            faith = edge_circuit_metric(model, clean, corrupt, metric, graph, keep)
            m_empty = curves[(best, "abs")]["m_empty"]
            m_full = curves[(best, "abs")]["m_full"]
            heads = sorted({graph.senders[s].name for s in keep.nonzero()[:, 0].tolist()
                            if graph.senders[s].kind == "head"}
                           | {graph.receivers[r].node.name for r in keep.nonzero()[:, 1].tolist()
                              if graph.receivers[r].node.kind == "head"},
                           key=lambda h: tuple(int(x) for x in h[1:].split(".h")))
            dense = scores[best].dense()
            effect = {h: float(dense[graph.sender_index(h)][keep[graph.sender_index(h)]].sum())
                      for h in heads}
            roles = head_roles(model, pairs, heads, threshold=opts.role_threshold, effect=effect)
            return {"keep": keep, "ranking": draw_by, "metric": faith, "faithfulness": (faith - m_empty) / (m_full - m_empty),
                    "n_edges": int(keep.sum()), "roles": [r.to_dict() for r in roles]}

        with study.timer("circuit"):
            drawn = study.cached(f"circuit_{draw_by}", circuit)
        figures = _figures(study, graph, scores, curves, best, drawn, fractions, config.model)
        _print(agreement, summary, best, drawn, config.model)
        return study.finish({
            "model": config.model,
            "graph": graph.summary(),
            "pairs": {"n": len(pairs), "corruption": opts.corruption, "examples": pairs.clean_texts[:3],
                      "token_lengths": sorted(set(pairs.lengths.tolist()))},
            "logit_diff": {"clean": metric.clean, "corrupt": metric.corrupt},
            "exact": {"receivers": receivers, "n_edges": len(scores["exact"]),
                      "n_edges_into_receivers": n_chosen, "sampled": sample},
            "agreement": agreement,
            "faithfulness": {f"{m}/{by}": curves[(m, by)] for m in METHODS for by in opts.rankings},
            "cpr_cmd": summary,
            "best_method": {"name": best, "criterion": "lowest CMD (circuits ranked by |score|)"},
            "circuit": {**{k: v for k, v in drawn.items() if k != "keep"},
                        "edges": _edge_list(graph, drawn["keep"], scores[best])},
            "paper": PAPER_NOTE,
            "figures": [p.name for p in figures],
        })


def _edge_list(graph: Graph, keep: torch.Tensor, scores) -> list[dict]:
    dense = scores.dense()
    rows = [{"edge": f"{graph.senders[s].name}->{graph.receivers[r].name}", "score": float(dense[s, r])}
            for s, r in keep.nonzero().tolist()]
    return sorted(rows, key=lambda row: -abs(row["score"]))


def _agreement(scores: dict, graph: Graph) -> dict:
    """Each method against exact patching on the exactly patched edges: all, into heads, into
    the logits."""
    exact = scores["exact"]
    into_logits = torch.tensor([n.endswith("->logits") for n in exact.names()])
    table = {}
    for name in METHODS:
        values = scores[name].values[exact.ids]
        rows = {}
        for part, mask in (("all", torch.ones_like(into_logits)), ("heads", ~into_logits),
                           ("logits", into_logits)):
            x, y = values[mask], exact.values[mask]
            if len(x) < 3:
                continue
            rows[part] = {"pearson": pearson(x, y), "spearman": spearman(x, y),
                          f"top{TOP_K}": top_k_overlap(x, y, TOP_K), "n_edges": int(mask.sum())}
        table[name] = rows
    return table


def _summary(curves: dict, name: str, rankings: Sequence[str]) -> dict:
    """MIB's CPR (signed ranking, `max`) and CMD (`abs` ranking); where only one ranking ran,
    both areas of that curve."""
    cpr_by = "max" if "max" in rankings else rankings[0]
    cmd_by = "abs" if "abs" in rankings else rankings[0]
    return {"cpr": curves[(name, cpr_by)]["cpr"], "cpr_ranking": cpr_by,
            "cmd": curves[(name, cmd_by)]["cmd"], "cmd_ranking": cmd_by}


def _figures(study: StudyRun, graph: Graph, scores: dict, curves: dict, best: str, drawn: dict,
             fractions: Sequence[float], model: str) -> list:
    out = study.out
    exact = scores["exact"]
    written = plots.save_figure(plots.scatter_vs(
        exact.values.tolist(), {m: scores[m].values[exact.ids].tolist() for m in METHODS},
        f"edge scores vs exact edge patching ({model})", "exact patching effect", "estimated effect"),
        out / "scatter_exact")
    series = {f"{m} ({by})": curves[(m, by)]["faithfulness"] for (m, by) in curves}
    fig = plots.lines(list(fractions), series, f"faithfulness of pruned top-edge circuits ({model})",
                      "fraction of edges kept", "faithfulness")
    fig.update_xaxes(type="log")
    written += plots.save_figure(fig, out / "faithfulness")
    roles = {r["head"]: r["role"] for r in drawn["roles"] if r["role"] != "other"}
    fig = plots.edge_circuit(graph, drawn["keep"], scores[best].dense(),
                             f"IOI circuit by {best} ({drawn['ranking']}): {drawn['n_edges']} edges, faithfulness "
                             f"{drawn['faithfulness']:.2f} ({model})", roles=roles)
    written += plots.save_figure(fig, out / "circuit")
    return written


def _print(agreement: dict, summary: dict, best: str, drawn: dict, model: str) -> None:
    print(f"\nedge scores vs exact edge patching ({model}): Pearson / Spearman / top-{TOP_K}")
    for name, rows in agreement.items():
        cells = "  ".join(f"{part} {r['pearson']:.3f}/{r['spearman']:.3f}/{r[f'top{TOP_K}']:.2f} (n={r['n_edges']})"
                          for part, r in rows.items())
        print(f"  {name:<7} {cells}")
    print("\nCPR (higher better) / CMD (lower better)")
    for name, s in summary.items():
        print(f"  {name:<7} CPR {s['cpr']:.3f} ({s['cpr_ranking']})  CMD {s['cmd']:.3f} ({s['cmd_ranking']})")
    print(f"\ncircuit by {best} ({drawn['ranking']}): {drawn['n_edges']} edges, faithfulness {drawn['faithfulness']:.3f}")
    print(f"  {'head':<8} {'role':<28} end->IO end->S1 end->S2 S2->S1 S2->S1+1  effect")
    for r in drawn["roles"]:
        a = r["attention"]
        print(f"  {r['head']:<8} {r['role']:<28} {a['end->IO']:7.2f} {a['end->S1']:7.2f} {a['end->S2']:7.2f} "
              f"{a['S2->S1']:6.2f} {a['S2->S1+1']:8.2f}  {r['effect']:+.3f}")
