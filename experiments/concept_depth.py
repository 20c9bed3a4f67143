"""Concept Depth: at which layer does each concept become linearly decodable?

After "Exploring Concept Depth: How Large Language Models Acquire Knowledge at Different
Layers?" (Jin et al. 2024, arXiv 2404.07066). For each data set (by default the paper's six
shared ones: cities, common_claim, counterfact, strategyqa, coinflip, sst2; or any table with
`--dataset FILE --text-col ... --label-col ...`), a balanced seeded subsample of texts is run
through the model; the last-token residual stream is collected at every depth k = 0 ... n_layers
(k = 0: the embeddings, `blocks.0.hook_resid_pre`; k >= 1: after block k-1,
`blocks.{k-1}.hook_resid_post`), and a logistic-regression probe per depth predicts the label
(`interp.concepts.probes`, 5-fold cross-validation by default). The depth at which a concept
becomes decodable is the first k whose accuracy reaches chance + 0.9 x (best - chance), and its
relative depth is k / n_layers (see `interp.concepts.probes.decodable_depth`). A concept whose
best depth beats chance by less than two binomial standard errors (0.071 at 200 examples, and at
least 0.05) counts as not decodable.

That strict depth is the headline number, but on a plateau near the threshold it can jump many
layers on less than one example (SmolLM2 cities: 0.760 at depth 12 against a threshold of 0.761
gives depth 21). So each depth comes with its range (`interp.concepts.probes.depth_range`): from
the first depth whose accuracy is within one standard error of the threshold to the first one
more than one standard error above it (or the best depth), the standard error being
`accuracy_std / sqrt(folds - 1)` of the cross-validation folds (`--range-z` sets how many). Two
strict depths whose ranges overlap are not clearly told apart by these data.

Conditions (the paper's two perturbations, plus the unperturbed run):
- `none`: the texts as they are, weights as loaded (raw converted weights, `processing=False`,
  like the paper's Hugging Face models; float32 unless `--dtype` says otherwise);
- `noise`: each text prefixed with "aaa" or "bbb" at random (seeded), the perturbation of the
  authors' code (`interp.concepts.datasets.add_noise`); added before any prompt wrapping;
- `bf16`, `fp16`: every parameter rounded to bfloat16 / float16 and back, run in float32
  (the paper's 16-bit setting loaded the model in bfloat16);
- `int8`: the attention and MLP weight matrices rounded to symmetric 8-bit integers with one
  absmax scale per output channel, run in float32. Embeddings, unembedding and norms stay as
  they are, as in bitsandbytes' LLM.int8 (the paper's 8-bit setting); unlike LLM.int8 there is
  no float16 path for outlier features, so this rounding is harsher.
The embedded models are already 4-bit GGUF quantisations, dequantised to float32; rounding adds
to that.

`--prompt` wraps each text in the data set's instruction (`interp.concepts.datasets.PROMPTS`,
in the paper's layout); by default the bare texts are probed. Writes `results.json` (per data
set and condition: accuracy, F1 and AUC per depth, the decodable depth and its range, counts,
timings; the settings), `curves.{html,png}` (accuracy per depth, one line per data set),
`curves_<data set>.{html,png}` (one line per condition), `relative_depth.{html,png}` (relative
depth per data set and condition, the range as error bars) and, one level up,
`relative_depth_models.{html,png}` comparing every model with results there. Prints two tables
(strict depths, ranges). Each (data set, condition) result is saved when done (`runs/`, keyed by
everything that changes the curves, not by `--fraction`, `--range-z` or the wording of the
definitions, which only enter the summary), so an interrupted run resumes where it stopped and a
changed summary setting recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from transformer_lens import HookedTransformer

from interp import models, plots
from interp.concepts.collect import collect
from interp.concepts.datasets import CONCEPT_DEPTH, ConceptDataset, load_dataset, load_table
from interp.concepts.probes import decodable_depth, depth_range, layer_probes, standard_errors
from interp.results import write_results
from interp.studies import StudyConfig, StudyInputError, check_minimum, torch_threads

DESCRIPTION = ("Concept Depth (Jin et al. 2024): probe accuracy per layer for each data set, the "
               "depth where each concept becomes decodable, under input noise and weight rounding.")
CONDITIONS = ("none", "noise", "bf16", "fp16", "int8")
#: bf16/fp16 are off by default: on both embedded models they left every accuracy curve within
#: 0.02 (4 of 200 examples) of the unperturbed one, yet cost as much as any other condition.
DEFAULT_CONDITIONS = ("none", "noise", "int8")
#: Weight matrices rounded by `int8`, with the axes that feed each output channel (TL layouts:
#: W_Q/W_K/W_V [head, d_model, d_head], W_O [head, d_head, d_model], W_in/W_gate
#: [d_model, d_mlp], W_out [d_mlp, d_model]).
INT8_INPUT_AXES = {"W_Q": (1,), "W_K": (1,), "W_V": (1,), "W_O": (0, 1),
                   "W_in": (0,), "W_gate": (0,), "W_out": (0,)}
#: Settings that only enter the summary (depths are recomputed from the saved curves every run),
#: so they are left out of the key of the saved per-run results.
SUMMARY_SETTINGS = ("fraction", "range_z", "depth_definition", "depth_range_definition")


def add_arguments(parser) -> None:
    parser.add_argument("--datasets", nargs="+", default=list(CONCEPT_DEPTH),
                        help=f"shared data sets to run (default all: {' '.join(CONCEPT_DEPTH)})")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="a CSV/TSV/JSON/JSONL file to run instead (needs --text-col, --label-col)")
    parser.add_argument("--text-col", default=None, help="with --dataset: the text column")
    parser.add_argument("--label-col", default=None, help="with --dataset: the binary label column")
    parser.add_argument("--positive", default=None, help="with --dataset: the label value that is 1")
    parser.add_argument("--label-map", nargs="+", default=None, metavar="VALUE=0|1",
                        help="with --dataset: map label values to 0/1; other rows are dropped")
    parser.add_argument("--records-key", default=None, help="with --dataset (JSON object): list key")
    parser.add_argument("--n-examples", type=int, default=200,
                        help="balanced subsample per data set (default 200; 0 = all)")
    parser.add_argument("--conditions", nargs="+", default=list(DEFAULT_CONDITIONS), choices=CONDITIONS,
                        help=f"default: {' '.join(DEFAULT_CONDITIONS)}")
    parser.add_argument("--prompt", action="store_true", help="wrap texts in the data set's instruction")
    parser.add_argument("--chat-template", action="store_true", help="apply the model's chat template")
    parser.add_argument("--cv-folds", type=int, default=5, help="cross-validation folds (0: hold-out split)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="hold-out fraction (with --cv-folds 0)")
    parser.add_argument("--C", dest="C", type=float, default=1.0, help="inverse L2 strength of the probes")
    parser.add_argument("--fraction", type=float, default=0.9,
                        help="decodable: accuracy >= chance + fraction x (best - chance) (default 0.9)")
    parser.add_argument("--range-z", type=float, default=1.0,
                        help="depth range: layers within this many standard errors of the "
                             "threshold (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-gb", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for this run (default: torch's own choice); on a "
                             "machine shared with other jobs, 1 can be several times faster")


def round_weights(model: HookedTransformer, precision: str) -> HookedTransformer:
    """Round the model's weights in place to a lower precision, keeping their float32 storage.

    `"bf16"` / `"fp16"`: every parameter through bfloat16 / float16 and back. `"int8"`: the
    attention and MLP matrices (`INT8_INPUT_AXES`) to `round(w / s) * s` with `s = absmax / 127`
    per output channel, other parameters unchanged. Buffers (rotary tables, masks) are left as
    they are.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if precision in ("bf16", "fp16"):
                dt = torch.bfloat16 if precision == "bf16" else torch.float16
                param.copy_(param.to(dt).to(param.dtype))
            elif precision == "int8":
                key = name.rsplit(".", 1)[-1].lstrip("_")
                if key not in INT8_INPUT_AXES:
                    continue
                scale = param.abs().amax(dim=INT8_INPUT_AXES[key], keepdim=True) / 127.0
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                param.copy_(torch.round(param / scale).clamp(-127, 127) * scale)
            else:
                raise ValueError(f"unknown precision {precision!r}; use bf16, fp16 or int8")
    return model


def _datasets(config: StudyConfig, options: dict[str, Any]) -> list[ConceptDataset]:
    limit = options["n_examples"] or None
    if options["dataset"] is not None:
        if not options["text_col"] or not options["label_col"]:
            raise StudyInputError("--dataset needs --text-col and --label-col (the columns "
                                  "holding the text and the binary label)")
        label_map = None
        if options["label_map"]:
            label_map = {}
            for item in options["label_map"]:
                value, sep, target = item.rpartition("=")
                if not sep or target not in ("0", "1"):
                    raise StudyInputError(f"--label-map items are VALUE=0 or VALUE=1, got {item!r}")
                label_map[value] = int(target)
        return [load_table(options["dataset"], options["text_col"], options["label_col"],
                           positive=options["positive"], label_map=label_map,
                           drop_unmapped=label_map is not None, records_key=options["records_key"],
                           limit=limit, seed=config.seed)]
    return [load_dataset(name, limit=limit, seed=config.seed) for name in options["datasets"]]


def _hooks(model: HookedTransformer) -> list[str]:
    """Depth k = 0 (embeddings) ... n_layers (after the last block)."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]


def _load(config: StudyConfig, condition: str) -> HookedTransformer:
    rounded = condition in ("bf16", "fp16", "int8")
    model = models.load(config.model, device=config.device, processing=False,
                        dtype="float32" if rounded else config.dtype)
    return round_weights(model, condition) if rounded else model


def run(config: StudyConfig, datasets: list[str] | None = None, dataset: Path | None = None,
        text_col: str | None = None, label_col: str | None = None, positive: str | None = None,
        label_map: list[str] | None = None, records_key: str | None = None,
        n_examples: int = 200, conditions: list[str] | None = None, prompt: bool = False,
        chat_template: bool = False, cv_folds: int = 5, test_fraction: float = 0.2,
        C: float = 1.0, fraction: float = 0.9, range_z: float = 1.0, batch_size: int = 32,
        memory_gb: float = 2.0, threads: int | None = None) -> dict:
    check_minimum("n_examples", n_examples, 0)
    check_minimum("cv_folds", cv_folds, 0)
    check_minimum("batch_size", batch_size, 1)
    check_minimum("threads", threads, 1)
    if cv_folds == 1:
        raise StudyInputError("cv_folds must be 0 (one hold-out split) or >= 2, got 1 (--cv-folds)")
    if not cv_folds and not 0 < test_fraction < 1:
        raise StudyInputError(f"test_fraction must be between 0 and 1, got {test_fraction} "
                              "(--test-fraction)")
    if threads is not None:  # set for this run only
        with torch_threads(threads):
            return run(**dict(locals(), threads=None))
    options = dict(datasets=datasets or list(CONCEPT_DEPTH), dataset=dataset, text_col=text_col,
                   label_col=label_col, positive=positive, label_map=label_map,
                   records_key=records_key, n_examples=n_examples)
    conditions = list(conditions or DEFAULT_CONDITIONS)
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise StudyInputError(f"unknown conditions {unknown}; choose from {CONDITIONS}")
    torch.manual_seed(config.seed)
    out = config.out_dir("concept-depth")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    data = _datasets(config, options)
    settings = {"model": config.model, "dtype": str(config.dtype or "float32"), "seed": config.seed,
                "n_examples": n_examples, "prompt": prompt, "chat_template": chat_template,
                "pool": "last", "hooks": "resid_pre 0 + resid_post of every block",
                "probe": {"cv_folds": cv_folds or None, "test_fraction": None if cv_folds else test_fraction,
                          "C": C, "standardize": True, "max_iter": 1000},
                "weights": "raw (processing=False)", "fraction": fraction,
                "depth_definition": "first k with accuracy >= chance + fraction*(best-chance); "
                                    "k = blocks applied (0 = embeddings); relative = k / n_layers; "
                                    "not decodable when best - chance < max(0.05, 2 binomial "
                                    "standard errors at n examples)",
                "range_z": range_z,
                "depth_range_definition": "low = first k with accuracy + range_z*se >= threshold; "
                                          "high = first k with accuracy - range_z*se >= threshold, "
                                          "or the best k if earlier; se = accuracy_std / "
                                          "sqrt(folds - 1) (cv) or binomial (hold-out)"}
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    per_data: dict[str, dict[str, Any]] = {
        ds.name: {"source": ds.source, "n": len(ds), "counts": list(ds.counts),
                  "label_names": list(ds.label_names), "info": ds.info, "example": ds.texts[0],
                  "conditions": {}} for ds in data}
    n_layers = None
    for condition in conditions:
        model = None
        for ds in data:
            key = _run_key(settings, ds, condition)
            path = run_dir / f"{ds.name}__{condition}__{key}.json"
            if path.exists():  # resume: finished by an earlier run with the same settings
                entry = json.loads(path.read_text())
                print(f"{ds.name} / {condition}: loaded from {path}")
            else:
                if model is None:
                    model = _load(config, condition)
                entry = _one(model, ds, condition, config.seed, prompt, chat_template, cv_folds,
                             test_fraction, C, batch_size, memory_gb)
                path.with_suffix(".tmp").write_text(json.dumps(entry))  # a kill leaves no half file
                path.with_suffix(".tmp").replace(path)
                sec = entry["seconds"]
                print(f"{ds.name} / {condition}: collection {sec['collect']:.1f} s "
                      f"({sec['collect_cpu']:.1f} s CPU), probes {sec['probes']:.1f} s "
                      f"({sec['probes_cpu']:.1f} s CPU)")
            n_layers = entry["n_layers"]
            entry["min_gain"] = _min_gain(len(ds), entry["chance"])
            entry["depth"] = decodable_depth(entry["accuracy"], entry["layers"], n_layers,
                                             fraction=fraction, chance=entry["chance"],
                                             min_gain=entry["min_gain"])._asdict()
            se = standard_errors(entry["accuracy"], entry["accuracy_std"], entry["split"])
            entry["depth_range"] = depth_range(entry["accuracy"], se, entry["layers"], n_layers,
                                               fraction=fraction, chance=entry["chance"],
                                               min_gain=entry["min_gain"], z=range_z)._asdict()
            per_data[ds.name]["conditions"][condition] = entry
        del model
    _print_table(per_data, conditions, config.model, n_layers)
    figures = _figures(per_data, conditions, out, config.model)
    results = {
        "study": "concept-depth",
        "config": config,
        "settings": settings,
        "n_layers": n_layers,
        "datasets": per_data,
        "paper": {"source": "Jin et al. 2024, Exploring Concept Depth (arXiv 2404.07066)",
                  "finding": "simple concepts (e.g. sentiment, cities) are decodable in early "
                             "layers, harder ones (e.g. StrategyQA, coinflip) only in deeper "
                             "layers if at all; noise and lower precision shift depth later"},
        "timings_s": {"total": time.perf_counter() - t_start,
                      "total_cpu": time.process_time() - cpu_start,
                      "threads": torch.get_num_threads()},
        "figures": [f.name for f in figures],
    }
    path = write_results(out, results)
    figures += _model_summary(Path(config.out) / "concept-depth")
    print(f"wrote {path} and {len(figures)} figure files")
    return results


def _min_gain(n: int, chance: float) -> float:
    """The best layer must beat chance by two binomial standard errors of an accuracy measured on
    `n` examples (and by at least 0.05) for a concept to count as decodable."""
    return max(0.05, 2 * math.sqrt(chance * (1 - chance) / n))


def _run_key(settings: dict, ds: ConceptDataset, condition: str) -> str:
    ident = {k: v for k, v in settings.items() if k not in SUMMARY_SETTINGS}
    digest = hashlib.sha256("\x00".join(ds.texts).encode() + str(ds.labels).encode()).hexdigest()
    ident.update(condition=condition, data=digest)
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _one(model: HookedTransformer, ds: ConceptDataset, condition: str, seed: int, prompt: bool,
         chat_template: bool, cv_folds: int, test_fraction: float, C: float, batch_size: int,
         memory_gb: float) -> dict[str, Any]:
    """Collect, probe and time one data set under one condition."""
    if condition == "noise":
        ds = ds.with_noise(seed)
    if prompt:
        ds = ds.prompted()
    t0, c0 = time.perf_counter(), time.process_time()
    acts = collect(model, ds.texts, _hooks(model), layers=None, pool="last", batch_size=batch_size,
                   chat_template=chat_template, memory_gb=memory_gb, progress=False)
    t_collect, c_collect = time.perf_counter() - t0, time.process_time() - c0
    features = {0: acts["blocks.0.hook_resid_pre"]}
    features.update({l + 1: acts[f"blocks.{l}.hook_resid_post"] for l in range(model.cfg.n_layers)})
    t0, c0 = time.perf_counter(), time.process_time()
    probes = layer_probes(features, ds.labels, test_fraction=test_fraction,
                          cv_folds=cv_folds or None, seed=seed, C=C, n_layers=model.cfg.n_layers)
    t_probes, c_probes = time.perf_counter() - t0, time.process_time() - c0
    return {"layers": probes.layers, "accuracy": probes.accuracy, "f1": probes.f1,
            "auc": probes.auc, "accuracy_std": probes.accuracy_std, "chance": probes.chance,
            "split": probes.split, "n_layers": model.cfg.n_layers, "example": ds.texts[0],
            "tokens": int(acts.n_tokens.sum()), "seconds": {"collect": t_collect, "probes": t_probes,
                        "collect_cpu": c_collect, "probes_cpu": c_probes}}


def _fmt_depth(depth: dict) -> str:
    if depth["layer"] is None:
        return "   -   "
    return f"{depth['layer']:>2} ({depth['relative']:.2f})"


def _fmt_range(r: dict) -> str:
    if r["low"] is None:
        return "-"
    return f"{r['low']}-{r['high']} ({r['low_relative']:.2f}-{r['high_relative']:.2f})"


def _print_table(per_data: dict, conditions: list[str], model: str, n_layers: int | None) -> None:
    print(f"\nConcept depth on {model} ({n_layers} layers): first depth k reaching the threshold "
          "(relative depth k/n_layers); best accuracy")
    header = f"{'data set':<14}" + "".join(f"{c:>22}" for c in conditions)
    print(header)
    for name, entry in per_data.items():
        cells = []
        for c in conditions:
            e = entry["conditions"][c]
            cells.append(f"{_fmt_depth(e['depth'])} {e['depth']['best_accuracy']:.2f}".rjust(22))
        print(f"{name:<14}" + "".join(cells))
    z = next(iter(next(iter(per_data.values()))["conditions"].values()))["depth_range"]["z"]
    print(f"\nDepth range: from the first depth within {z:g} standard error(s) of the threshold "
          "to the first one beyond it (or the best depth); relative in brackets")
    print(header)
    for name, entry in per_data.items():
        print(f"{name:<14}" + "".join(_fmt_range(entry["conditions"][c]["depth_range"]).rjust(22)
                                      for c in conditions))


def _figures(per_data: dict, conditions: list[str], out: Path, model: str) -> list[Path]:
    written = []
    base = "none" if "none" in conditions else conditions[0]
    first = next(iter(per_data.values()))["conditions"][base]
    written += plots.save_figure(
        plots.lines(first["layers"], {n: e["conditions"][base]["accuracy"] for n, e in per_data.items()},
                    f"Probe accuracy per depth ({model}, {base})", "depth k (blocks applied)",
                    "accuracy"), out / "curves")
    for name, entry in per_data.items():
        written += plots.save_figure(
            plots.lines(first["layers"], {c: entry["conditions"][c]["accuracy"] for c in conditions},
                        f"{name}: probe accuracy per depth ({model})", "depth k (blocks applied)",
                        "accuracy"), out / f"curves_{name}")
    bars = []
    for c in conditions:
        depths = [e["conditions"][c]["depth"] for e in per_data.values()]
        ranges = [e["conditions"][c]["depth_range"] for e in per_data.values()]
        y = [d["relative"] for d in depths]
        bars.append(go.Bar(name=c, x=list(per_data), y=y, error_y=dict(
            type="data", symmetric=False,
            array=[None if v is None else r["high_relative"] - v for v, r in zip(y, ranges)],
            arrayminus=[None if v is None else v - r["low_relative"] for v, r in zip(y, ranges)])))
    fig = go.Figure(bars)
    z = first["depth_range"]["z"]
    fig.update_layout(barmode="group", title=f"Relative concept depth ({model}; whiskers: depth range "
                                             f"at {z:g} standard error; missing bar: not decodable)",
                      xaxis_title="data set", yaxis_title="relative depth k / n_layers",
                      yaxis_range=[0, 1], template="plotly_white")
    written += plots.save_figure(fig, out / "relative_depth")
    return written


def _model_summary(study_dir: Path) -> list[Path]:
    """Relative depth (unperturbed) per data set for every model with results here."""
    series: dict[str, dict[str, float | None]] = {}
    for path in sorted(study_dir.glob("*/results.json")):
        res = json.loads(path.read_text())
        series[path.parent.name] = {
            name: e["conditions"].get("none", next(iter(e["conditions"].values())))["depth"]["relative"]
            for name, e in res.get("datasets", {}).items()}
    if not series:
        return []
    names = sorted({n for s in series.values() for n in s})
    fig = go.Figure([go.Bar(name=m, x=names, y=[s.get(n) for n in names]) for m, s in series.items()])
    fig.update_layout(barmode="group", title="Relative concept depth per data set and model (unperturbed)",
                      xaxis_title="data set", yaxis_title="relative depth k / n_layers",
                      yaxis_range=[0, 1], template="plotly_white")
    return plots.save_figure(fig, study_dir / "relative_depth_models")
