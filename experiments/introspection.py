"""Introspection (Macar et al. 2026, "Mechanisms of introspective awareness", arXiv 2603.21396):
inject a concept vector and ask the model whether it detects an injected thought.

A thin study over `interp.introspection`:

1. **Concept vectors** of the test concepts at every swept layer (`resid_post`, last token of
   "Tell me about {word}" minus the baseline mean), and the typical residual norm per layer.
2. **Sweep** over layers x strengths (raw `--strengths` and `--relative-strengths`, the
   latter a multiple of the layer's residual norm over the mean vector norm) x concepts x
   trials: injection and forced-identification trials (generated, graded by the rule-based
   judge), the Yes-No logit gap at the first answer token, and coherence (perplexity under the
   unhooked model). Control trials (no injection) once per prompt variant. Each cell is a
   resume unit.
3. **Best cell** by the continuous measure (mean gap injected minus control); there the
   **controls** (norm-matched random vectors; the yes-bias check on unrelated yes/no
   questions; prompt variants) and the **mechanism** (exact ablation / knock-in of every later
   attention and MLP output, AtP and RelP of the same metric to those outputs and to heads;
   gate and evidence-carrier candidates among MLP neurons) and the same for **SAE latents**:
   TopK SAEs trained on the corpus (`interp.saes.train_or_load`) at the MLP output right after
   the injection layer (evidence carriers) and at the late MLP (>= 70% depth) whose exact
   ablation moves the gap most (gates), attached with their error term; AtP and RelP to every
   latent, the largest checked by exact single-latent ablation.
4. **Trained bias** (the paper's experiment 14): one vector on the MLP output of
   `--bias-layer` trained on injected and control trials of training concepts; detection,
   identification and false alarms on held-out concepts before and after, per injection layer.

A base model (no chat template, e.g. `gemma-3-270m`) is run with the plain
"User: ... / Assistant: ..." format and labelled so in the results. `--quick` shrinks every
stage (see `QUICK`) to fit a few minutes on 2 CPU cores; the defaults are the paper's setting
(all layers, strengths 1-16, 50 concepts, temperature 1) and run unchanged on a GPU with
`--model google/gemma-3-27b-it --device cuda`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens import HookedTransformer

from interp import introspection as I
from interp import plots
from interp.attribution.lrp import LRPRules
from interp.studies import StudyConfig, StudyRun, option, options_parser, torch_threads, with_quick

DESCRIPTION = ("Introspection (Macar et al. 2026): inject concept vectors, ask the model whether "
               "it detects an injected thought; sweeps, controls, mechanism, trained bias.")
STUDY = "introspection"
PAPER = {
    "source": "Macar et al. 2026, Mechanisms of introspective awareness (arXiv 2603.21396), "
              "code safety-research/introspection-mechanisms",
    "model": "Gemma3-27B-IT (62 layers)",
    "setting": "injection layer 37/62 (~60% depth), strength 4",
    "detection_hit_rate": 0.41, "detection_false_alarm_rate": 0.0,
    "combined_detection_and_identification_rate": 0.23,
    "detection_peak_depth": 0.47, "identification_peak_depth": 0.60,
    "mechanism": "MLPs near 70% depth and late gate features carry the decision",
    "trained_bias": "+75 points detection on held-out concepts, no rise in false alarms",
}
VARIANTS = ("ORIGINAL", "SKEPTICAL", "STRUCTURED_FORMAT", "UNPROMPTED")


@dataclass
class Options:
    """The study's options (the command line is built from them)."""

    quick: bool = option(False, "small setting for a CPU (QUICK, for the options left "
                                  "at their defaults)")
    layers: Sequence[int] | None = option(None, "injection layers (default: every layer)")
    layer_fractions: Sequence[float] | None = option(None, "injection layers as fractions of "
                                                     "depth (instead of --layers)")
    strengths: Sequence[float] = option((1.0, 2.0, 4.0, 8.0, 16.0), "raw strengths (h += s v)")
    relative_strengths: Sequence[float] = option((0.5, 1.0), "strengths as a multiple r of the "
                                                 "layer's residual norm: s = r * norm / mean |v|")
    n_concepts: int = option(50, "test concepts (the first n of the 50)", minimum=1)
    n_trials: int = option(5, "injection trials per concept and cell (trial numbers 1..n)",
                           minimum=1)
    n_forced: int = option(2, "forced-identification trials per concept and cell", minimum=0)
    n_control_trials: int = option(10, "control trial numbers", minimum=1)
    control_samples: int = option(5, "completions per control trial number", minimum=1)
    max_new_tokens: int = option(40, "tokens per answer (the paper: 100)", minimum=1)
    temperature: float = option(1.0, "sampling temperature (the paper: 1.0; 0: greedy)",
                                minimum=0.0)
    max_perplexity: float = option(200.0, "coherent: perplexity under the unhooked model <= this")
    variants: Sequence[str] = option(VARIANTS, "prompt variants for the control at the best cell")
    controls: bool = option(True, "skip the controls", negate="--no-controls")
    n_random: int = option(10, "norm-matched random vectors at the best cell", minimum=0)
    mechanism: bool = option(True, "skip the mechanism", negate="--no-mechanism")
    mechanism_concepts: int = option(8, "concepts for the mechanism", minimum=1)
    mechanism_stride: int = option(1, "every n-th later layer in the mechanism", minimum=1)
    mechanism_saes: bool = option(True, "skip the SAE latents in the mechanism",
                                  negate="--no-mechanism-saes")
    sae_tokens: int = option(150_000, "corpus tokens per mechanism SAE", minimum=256)
    sae_expansion: int = option(4, "mechanism SAE width / d_model", minimum=1)
    sae_k: int = option(32, "active latents per token of the mechanism SAEs (TopK)", minimum=1)
    bias: bool = option(True, "skip the trained bias", negate="--no-bias")
    bias_layer: int | None = option(None, "meta-layer of the bias (default: ~70% depth)")
    bias_train_concepts: int = option(400, "training concepts (the paper: 400)", minimum=1)
    bias_held_out: int = option(100, "held-out concepts (the paper: 100)", minimum=1)
    bias_eval_concepts: int = option(20, "held-out concepts evaluated by generation", minimum=1)
    bias_steps: int = option(400, "optimiser steps", minimum=1)
    bias_batch: int = option(8, "examples per step", minimum=1)
    bias_lr: float = option(1e-2, "AdamW learning rate of the bias", minimum=0.0)
    bias_relative_strengths: Sequence[float] = option((0.5, 1.0, 2.0), "training/eval "
                                                      "strengths, relative to the residual norm")
    bias_eval_layers: int = option(4, "injection layers evaluated before/after", minimum=1)
    batch_size: int = option(16, "rows per forward pass", minimum=1)
    threads: int | None = option(None, "torch CPU threads (default: torch's own)", minimum=1)


#: `--quick`: a few layers, strengths, concepts and trials, short answers.
QUICK = dict(layer_fractions=(0.3, 0.5, 0.7), strengths=(4.0, 16.0), relative_strengths=(1.0,),
             n_concepts=3, n_trials=1, n_forced=1, n_control_trials=2, control_samples=2,
             max_new_tokens=12, n_random=3, mechanism_concepts=3, mechanism_stride=3,
             sae_tokens=30_000,
             bias_train_concepts=24, bias_held_out=6, bias_eval_concepts=3, bias_steps=20,
             bias_batch=4, bias_eval_layers=2, bias_relative_strengths=(1.0,))

add_arguments = options_parser(Options)


def _layers(model: HookedTransformer, opts: Options) -> list[int]:
    n = model.cfg.n_layers
    if opts.layers is not None:
        return sorted({layer % n for layer in opts.layers})
    if opts.layer_fractions is not None:
        return sorted({min(n - 1, max(0, round(f * (n - 1)))) for f in opts.layer_fractions})
    return list(range(n))


def _trials_json(results: I.TrialResults) -> list[dict[str, Any]]:
    return [{"trial_type": t.trial_type, "concept": t.concept, "trial": n, "completion": t.completion,
             "perplexity": None if math.isnan(p) else p}
            for t, n, p in zip(results.trials, results.trial_numbers, results.perplexity)]


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


class Sweep:
    """What the study's stages share: model, options, data, vectors and norms."""

    def __init__(self, model: HookedTransformer, study: StudyRun, opts: Options, seed: int):
        self.model, self.study, self.opts, self.seed = model, study, opts, seed
        self.concepts = I.load_concepts()
        self.templates = I.load_templates()
        missing = [v for v in opts.variants if v not in self.templates]
        if missing:
            from interp.studies import StudyInputError
            raise StudyInputError(f"unknown prompt variants {missing}; known: "
                                  f"{sorted(self.templates)}")
        self.words = list(self.concepts.test[:opts.n_concepts])
        self.layers = _layers(model, opts)
        self.original = self.templates["ORIGINAL"]
        self.units: list[str] = []
        self._memo: dict[str, Any] = {}

    def cached(self, unit: str, compute):
        """`study.cached`, remembering the unit's name (listed in results.json as `units`)."""
        if unit not in self._memo:  # read once per run, so reused_from_cache means earlier runs
            self.units.append(unit)
            self._memo[unit] = self.study.cached(unit, compute)
        return self._memo[unit]

    def gen_kwargs(self) -> dict[str, Any]:
        o = self.opts
        return dict(max_new_tokens=o.max_new_tokens, temperature=o.temperature, seed=self.seed,
                    batch_size=o.batch_size)

    def vectors(self) -> dict[str, Any]:
        def compute():
            vec = I.concept_vectors(self.model, self.words, self.concepts.baseline, self.layers,
                                    self.opts.batch_size)
            norms = I.residual_norm(self.model, I.trial_prompt(self.model, self.original, 1),
                                    self.layers)
            return {"vectors": vec, "resid_norm": norms}
        return self.cached("vectors", compute)

    def controls(self, template: I.PromptTemplate) -> dict[str, Any]:
        def compute():
            o = self.opts
            res = I.control_trials(self.model, template, range(1, o.n_control_trials + 1),
                                   o.control_samples, **self.gen_kwargs())
            prompts = [I.trial_prompt(self.model, template, t) for t in
                       range(1, o.n_control_trials + 1)]
            gaps = I.yes_no_gap(self.model, prompts, batch_size=o.batch_size).tolist()
            return {"trials": res, "gap": gaps}
        return self.cached(f"control_{template.name}", compute)

    def cell(self, template: I.PromptTemplate, layer: int, strength: float,
             vectors: torch.Tensor, words: Sequence[str], unit: str) -> dict[str, Any]:
        """Injection + forced trials and gaps of `words` (rows of `vectors`) at one cell."""
        def compute():
            o = self.opts
            trials = range(1, o.n_trials + 1)
            forced = range(o.n_trials + 1, o.n_trials + 1 + o.n_forced)
            res = I.TrialResults()
            injections = [I.Injection(v, layer, strength) for v in vectors]
            for w, inj in zip(words, injections):
                res = res + I.injected_trials(self.model, template, w, inj, trials, forced,
                                              **self.gen_kwargs())
            prompts, rows, marks = [], [], []
            for inj in injections:
                for t in trials:
                    prompts.append(I.trial_prompt(self.model, template, t))
                    rows.append(inj)
                    marks.append(I.injection_marker(t))
            gaps = I.yes_no_gap(self.model, prompts, rows, marks, o.batch_size).tolist()
            return {"trials": res, "gap": gaps}
        return self.cached(unit, compute)

    def summarise(self, cell: dict[str, Any], control: dict[str, Any]) -> dict[str, Any]:
        both = cell["trials"] + control["trials"]
        injected = I.TrialResults(
            [t for t in cell["trials"].trials if t.trial_type == "injection"],
            [n for t, n in zip(cell["trials"].trials, cell["trials"].trial_numbers)
             if t.trial_type == "injection"],
            [p for t, p in zip(cell["trials"].trials, cell["trials"].perplexity)
             if t.trial_type == "injection"])
        return {"metrics": I.trial_metrics(both),
                "gap_injected": _mean(cell["gap"]), "gap_control": _mean(control["gap"]),
                "gap_difference": _mean(cell["gap"]) - _mean(control["gap"]),
                "coherence_injected": I.coherence_rate(injected, self.opts.max_perplexity),
                "coherence_control": I.coherence_rate(control["trials"], self.opts.max_perplexity)}


def run_sweep(sw: Sweep) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    o, model = sw.opts, sw.model
    data = sw.vectors()
    vec, norms = data["vectors"], data["resid_norm"]
    control = sw.controls(sw.original)
    cells = []
    for li, layer in enumerate(sw.layers):
        mean_norm = float(vec[li].norm(dim=-1).mean())
        specs = [("raw", s, s) for s in o.strengths]
        specs += [("relative", r, r * float(norms[li]) / mean_norm) for r in o.relative_strengths]
        for kind, value, strength in specs:
            unit = f"cell_L{layer}_{kind}{value:g}"
            cell = sw.cell(sw.original, layer, strength, vec[li], sw.words, unit)
            cells.append({"unit": unit, "layer": layer, "depth": layer / max(1, model.cfg.n_layers - 1),
                          "kind": kind, "value": value, "strength": strength,
                          "relative_strength": I.relative_strength(strength, mean_norm,
                                                                   float(norms[li])),
                          **sw.summarise(cell, control), "trials": _trials_json(cell["trials"])})
    return cells, control


def run_controls(sw: Sweep, best: dict[str, Any]) -> dict[str, Any]:
    o, model = sw.opts, sw.model
    data = sw.vectors()
    li = sw.layers.index(best["layer"])
    vec = data["vectors"][li]
    layer, strength = best["layer"], best["strength"]
    out: dict[str, Any] = {"cell": {k: best[k] for k in ("layer", "kind", "value", "strength")}}
    control = sw.controls(sw.original)
    if o.n_random:
        n = min(o.n_random, len(sw.words))
        rand = I.random_like(vec[:n], seed=sw.seed)
        words = sw.words[:n]
        cell = sw.cell(sw.original, layer, strength, rand, words, "random")
        out["random"] = {**sw.summarise(cell, control), "trials": _trials_json(cell["trials"]),
                         "note": "norm-matched random directions, graded against the concept "
                                 "each replaces"}

    def yes_bias():
        prompts = [I.question_prompt(model, q) for q, _ in I.YES_NO_QUESTIONS]
        clean = I.yes_no_gap(model, prompts, batch_size=o.batch_size)
        shifted = []
        for v in vec[:min(len(sw.words), o.mechanism_concepts)]:
            inj = I.Injection(v, layer, strength)
            shifted.append(I.yes_no_gap(model, prompts, [inj] * len(prompts), [0] * len(prompts),
                                        o.batch_size))
        return {"clean": clean, "injected": torch.stack(shifted)}

    yb = sw.cached("yes_bias", yes_bias)
    truth = torch.tensor([a for _, a in I.YES_NO_QUESTIONS])
    out["yes_bias"] = {
        "gap_clean": float(yb["clean"].mean()), "gap_injected": float(yb["injected"].mean()),
        "shift": float(yb["injected"].mean() - yb["clean"].mean()),
        "accuracy_clean": float(((yb["clean"] > 0) == truth).float().mean()),
        "accuracy_injected": float(((yb["injected"] > 0) == truth).float().mean()),
        "n_questions": len(truth),
        "note": "unrelated yes/no questions, injection over the whole prompt; a positive shift "
                "is a generic push towards Yes, not detection"}
    out["variants"] = {}
    for name in o.variants:
        template = sw.templates[name]
        ctrl = sw.controls(template)
        # ORIGINAL at the best cell is the best cell itself (its unit is read back)
        unit = best["unit"] if name == "ORIGINAL" else f"variant_{name}"
        cell = sw.cell(template, layer, strength, vec, sw.words, unit)
        out["variants"][name] = {**sw.summarise(cell, ctrl), "trials": _trials_json(cell["trials"]),
                                 "control_trials": _trials_json(ctrl["trials"])}
    return out


def run_mechanism(sw: Sweep, best: dict[str, Any]) -> dict[str, Any]:
    o, model = sw.opts, sw.model
    layer, strength = best["layer"], best["strength"]
    li = sw.layers.index(layer)
    vec = sw.vectors()["vectors"][li][:o.mechanism_concepts]
    injections = [I.Injection(v, layer, strength) for v in vec]
    later = list(range(layer + 1, model.cfg.n_layers, o.mechanism_stride))
    prompt, marker = I.trial_prompt(model, sw.original, 1), I.injection_marker(1)

    def compute():
        out: dict[str, Any] = {"layer": layer, "strength": strength, "later_layers": later,
                               "concepts": sw.words[:len(vec)]}
        if later:
            out["exact"] = I.component_effects(model, prompt, marker, injections, later)
            out["atp"] = I.attribution_effects(model, prompt, marker, injections, later)
            out["relp"] = I.attribution_effects(model, prompt, marker, injections, later,
                                                rules=LRPRules.relp())
            out["gates"] = I.gate_neurons(model, prompt, marker, injections, later)
        strengths = sorted(set(o.strengths) | {strength})
        out["evidence"] = I.evidence_neurons(model, prompt, marker, vec, layer, strengths)
        return out

    mech = sw.cached("mechanism", compute)
    if later:
        from scipy.stats import pearsonr
        agree = {}
        for method in ("atp", "relp"):
            for fam in ("attn", "mlp"):
                # both on one convention: gap(injected) - gap(injected, component patched)
                x, y = mech["exact"][fam]["ablation"], mech[method][fam]
                agree[f"{method}_{fam}"] = (float(pearsonr(x, y)[0]) if len(x) > 2 and
                                            len(set(x)) > 1 and len(set(y)) > 1 else None)
        mech["pearson_with_exact_ablation"] = agree
        top = sorted(((fam, lay, v) for fam in ("attn", "mlp")
                      for lay, v in zip(later, mech["exact"][fam]["ablation"])),
                     key=lambda t: -abs(t[2]))[:5]
        mech["top_components"] = [{"family": f, "layer": lay, "ablation": v} for f, lay, v in top]
        if o.mechanism_saes:
            mech["latents"] = run_latents(sw, best, mech, vec, prompt, marker)
    return mech


def latent_sites(n_layers: int, layer: int, mech: dict[str, Any]) -> dict[str, str]:
    """The mechanism SAEs' hook points: `evidence` at the MLP output right after the injection
    layer, `gate` at the late MLP output (>= 70% depth, else the last later layer) whose exact
    ablation changed the gap most."""
    later = mech["later_layers"]
    ablation = dict(zip(later, mech["exact"]["mlp"]["ablation"]))
    late = [lay for lay in later if lay >= 0.7 * (n_layers - 1)] or later[-1:]
    gate = max(late, key=lambda lay: abs(ablation[lay]))
    return {"evidence": f"blocks.{layer + 1}.hook_mlp_out", "gate": f"blocks.{gate}.hook_mlp_out"}


def run_latents(sw: Sweep, best: dict[str, Any], mech: dict[str, Any], vec: torch.Tensor,
                prompt: str, marker: I.Marker, top: int = 10, n_exact: int = 5) -> dict[str, Any]:
    """The mechanism on SAE latents (module docstring): AtP / RelP to every latent of both
    SAEs and to their error terms (latents + error = the MLP output's own estimate), exact
    ablation of the `n_exact` largest by |AtP| per SAE, gate and evidence latents."""
    from scipy.stats import pearsonr

    from interp.saes import attach, latent_hook_name, train_or_load

    o, model = sw.opts, sw.model
    layer, strength = best["layer"], best["strength"]
    sites = latent_sites(model.cfg.n_layers, layer, mech)
    hooks = sorted(set(sites.values()))
    injections = [I.Injection(v, layer, strength) for v in vec]

    def compute():
        saes, info = train_or_load(model, hooks, "topk", k=o.sae_k, expansion=o.sae_expansion,
                                   n_tokens=o.sae_tokens, seed=sw.seed, prefix="introspection")
        out: dict[str, Any] = {"sites": sites, "saes": info, "per_sae": {}}
        with attach(model, saes):
            names = {h: latent_hook_name(h) for h in hooks}
            errors = {h: latent_hook_name(h, "error") for h in hooks}
            sites_all = [*names.values(), *errors.values()]
            atp = I.latent_attributions(model, prompt, marker, injections, sites_all)
            relp = I.latent_attributions(model, prompt, marker, injections, sites_all,
                                         rules=LRPRules.relp())
            for h, n in names.items():
                order = torch.argsort(atp[n].abs(), descending=True)
                picked = order[:n_exact].tolist()
                exact = I.latent_ablation_effects(model, prompt, marker, injections, n, picked)
                out["per_sae"][h] = {
                    "top_atp": [{"latent": j, "atp": float(atp[n][j]), "relp": float(relp[n][j]),
                                 "exact": exact[i] if i < n_exact else None}
                                for i, j in enumerate(order[:top].tolist())],
                    "atp_sum": float(atp[n].sum()), "relp_sum": float(relp[n].sum()),
                    # what the SAE misses: its error term's share of the component's effect
                    "error_atp": float(atp[errors[h]].sum()),
                    "error_relp": float(relp[errors[h]].sum()),
                    "pearson_atp_relp": float(pearsonr(atp[n].tolist(), relp[n].tolist())[0])
                    if atp[n].std() > 0 and relp[n].std() > 0 else None}
            gate_hook = sites["gate"]
            out["gates"] = I.gate_latents(model, prompt, marker, injections,
                                          {gate_hook: saes[gate_hook]}, top)
            strengths = sorted(set(o.strengths) | {strength})
            out["evidence"] = I.evidence_latents(model, prompt, marker, vec, layer, strengths,
                                                 sites["evidence"], top)
        return out

    return sw.cached("mechanism_latents", compute)


def run_bias(sw: Sweep, best: dict[str, Any] | None) -> dict[str, Any]:
    o, model = sw.opts, sw.model
    n = model.cfg.n_layers
    meta = o.bias_layer if o.bias_layer is not None else round(0.7 * (n - 1))
    train_words, held = sw.concepts.split(o.bias_train_concepts, o.bias_held_out, seed=42)
    eval_words = held[:o.bias_eval_concepts]
    candidates = [layer for layer in range(max(1, round(0.2 * (n - 1))), meta + 1)]
    step = max(1, len(candidates) // o.bias_eval_layers)
    eval_layers = candidates[::step][:o.bias_eval_layers]
    train_layers = candidates

    def vectors():
        vec = I.concept_vectors(model, train_words + eval_words, sw.concepts.baseline,
                                train_layers, o.batch_size)
        norms = I.residual_norm(model, I.trial_prompt(model, sw.original, 1), train_layers)
        return {"vectors": vec, "resid_norm": norms}

    data = sw.cached("bias_vectors", vectors)
    vec, norms = data["vectors"], data["resid_norm"]

    def strength(li: int, r: float, row: int) -> float:
        return r * float(norms[li]) / float(vec[li, row].norm())

    def train():
        rng = random.Random(42)
        examples = []
        for i, w in enumerate(train_words):
            t = rng.randint(1, 10)
            li = rng.randrange(len(train_layers))
            r = rng.choice(list(o.bias_relative_strengths))
            prompt = I.trial_prompt(model, sw.original, t)
            inj = I.Injection(vec[li, i], train_layers[li], strength(li, r, i))
            ex, start = I.bias_example(model, prompt, I.DETECT_TARGET.format(concept=w),
                                       I.injection_marker(t))
            examples.append((ex, start, inj))
            t2 = rng.randint(1, 10)
            ex, start = I.bias_example(model, I.trial_prompt(model, sw.original, t2), I.NO_TARGET,
                                       I.injection_marker(t2))
            examples.append((ex, start, None))
        return I.train_bias(model, meta, examples, steps=o.bias_steps, lr=o.bias_lr,
                            batch_size=o.bias_batch, seed=42)

    with sw.study.timer("bias_train"):
        trained = sw.cached("bias_train", train)

    r_eval = max(o.bias_relative_strengths)

    def evaluate(with_bias: bool):
        def compute():
            out = {}
            ctx = trained.hook(model) if with_bias else None
            if ctx is not None:
                ctx.attach()
            try:
                ctrl = I.control_trials(model, sw.original, range(1, o.n_control_trials + 1),
                                        o.control_samples, **sw.gen_kwargs())
                ctrl_gap = I.yes_no_gap(model, [I.trial_prompt(model, sw.original, t) for t in
                                                range(1, o.n_control_trials + 1)]).tolist()
                for layer in eval_layers:
                    li = train_layers.index(layer)
                    res = I.TrialResults()
                    prompts, rows, marks = [], [], []
                    for j, w in enumerate(eval_words):
                        row = len(train_words) + j
                        inj = I.Injection(vec[li, row], layer, strength(li, r_eval, row))
                        res = res + I.injected_trials(model, sw.original, w, inj,
                                                      range(1, o.n_trials + 1), (),
                                                      **sw.gen_kwargs())
                        for t in range(1, o.n_trials + 1):
                            prompts.append(I.trial_prompt(model, sw.original, t))
                            rows.append(inj)
                            marks.append(I.injection_marker(t))
                    gaps = I.yes_no_gap(model, prompts, rows, marks, o.batch_size).tolist()
                    out[layer] = {"trials": res, "gap": gaps}
            finally:
                if ctx is not None:
                    ctx.detach()
            return {"layers": out, "control": {"trials": ctrl, "gap": ctrl_gap}}
        return sw.cached("bias_after" if with_bias else "bias_before", compute)

    report: dict[str, Any] = {"meta_layer": meta, "train_layers": train_layers,
                              "eval_layers": eval_layers, "n_train_concepts": len(train_words),
                              "eval_concepts": eval_words, "eval_relative_strength": r_eval,
                              "bias_norm": float(trained.bias.norm()),
                              "loss_first": trained.losses[0], "loss_last": trained.losses[-1],
                              "losses": trained.losses, "per_layer": {}}
    for tag, with_bias in (("before", False), ("after", True)):
        ev = evaluate(with_bias)
        for layer in eval_layers:
            summary = sw.summarise(ev["layers"][layer], ev["control"])
            report["per_layer"].setdefault(str(layer), {})[tag] = {
                **summary, "trials": _trials_json(ev["layers"][layer]["trials"])}
        report.setdefault("control_trials", {})[tag] = _trials_json(ev["control"]["trials"])
    return report


def _figures(out, model_name: str, cells: list[dict[str, Any]], layers: list[int]) -> list[str]:
    written = []
    metrics = ("detection_hit_rate", "combined_detection_and_identification_rate",
               "forced_identification_accuracy", "detection_false_alarm_rate")
    import plotly.graph_objects as go
    fig = go.Figure()
    for kind, value in dict.fromkeys((c["kind"], c["value"]) for c in cells):
        row = [c for c in cells if c["kind"] == kind and c["value"] == value]
        label = f"s={value:g}" if kind == "raw" else f"r={value:g}"
        for m in metrics:
            fig.add_trace(go.Scatter(x=[c["depth"] for c in row],
                                     y=[c["metrics"][m]["rate"] for c in row],
                                     mode="lines+markers", name=f"{m} ({label})"))
    fig.update_layout(title=f"Introspection on {model_name}: rates against relative depth",
                      xaxis_title="injection layer / (n_layers - 1)", yaxis_title="rate",
                      template="plotly_white")
    written += [str(p) for p in plots.save_figure(fig, out / "rates_by_depth")]
    specs = list(dict.fromkeys((c["kind"], c["value"]) for c in cells))
    z = [[next((c["gap_difference"] for c in cells if c["layer"] == layer and
                (c["kind"], c["value"]) == s), math.nan) for s in specs] for layer in layers]
    fig = plots.heatmap(z, [f"s={v:g}" if k == "raw" else f"r={v:g}" for k, v in specs],
                        [str(layer) for layer in layers],
                        f"Yes-No logit gap, injected minus control ({model_name})", "strength",
                        "injection layer")
    written += [str(p) for p in plots.save_figure(fig, out / "gap_heatmap")]
    return written


def run(config: StudyConfig, **options: Any) -> dict:
    opts = Options(**options)
    if opts.quick:  # QUICK replaces the defaults; options given explicitly stay
        opts = with_quick(opts, QUICK)
    with torch_threads(opts.threads), StudyRun(STUDY, config, opts,
                                               ignore=("batch_size", "threads")) as study:
        model = study.load_model()
        sw = Sweep(model, study, opts, config.seed)
        fmt = I.prompt_format(model)
        with study.timer("sweep"):
            cells, control = run_sweep(sw)
        best = max(cells, key=lambda c: c["gap_difference"])
        results: dict[str, Any] = {
            "n_layers": model.cfg.n_layers, "layers": sw.layers, "concepts": sw.words,
            "prompt_format": ("chat template" if fmt == "template" else
                              "plain 'User:/Assistant:' (base model, as the paper runs base "
                              "models)"),
            "yes_no_tokens": I.yes_no_tokens(model),
            "resid_norm": dict(zip(map(str, sw.layers), sw.vectors()["resid_norm"].tolist())),
            "concept_vector_norm": dict(zip(map(str, sw.layers),
                                            sw.vectors()["vectors"].norm(dim=-1).mean(1).tolist())),
            "control": {"trials": _trials_json(control["trials"]), "gap": control["gap"]},
            "cells": cells,
            "best_cell": {k: best[k] for k in ("layer", "depth", "kind", "value", "strength",
                                               "relative_strength", "gap_difference", "metrics")},
            "paper": PAPER,
        }
        if opts.controls:
            with study.timer("controls"):
                results["controls"] = run_controls(sw, best)
        if opts.mechanism:
            with study.timer("mechanism"):
                results["mechanism"] = run_mechanism(sw, best)
        if opts.bias:
            with study.timer("bias"):
                results["trained_bias"] = run_bias(sw, best)
        results["figures"] = _figures(study.out, config.model, cells, sw.layers)
        results["units"] = sorted(set(sw.units))
        results = study.finish(results)
    _print_table(results, config.model)
    return results


def _print_table(results: dict, model: str) -> None:
    print(f"\nIntrospection on {model} ({results['prompt_format']}), {results['n_layers']} layers")
    print(f"{'layer':>5} {'strength':>14} {'rel':>6} {'gap inj-ctl':>11} {'detect':>7} "
          f"{'FA':>5} {'det+id':>7} {'forced':>7} {'coherent':>8}")
    for c in results["cells"]:
        m = c["metrics"]
        label = f"{c['kind'][:3]} {c['value']:g}"
        print(f"{c['layer']:>5} {label:>14} {c['relative_strength']:>6.2f} "
              f"{c['gap_difference']:>11.3f} {m['detection_hit_rate']['rate']:>7.2f} "
              f"{m['detection_false_alarm_rate']['rate']:>5.2f} "
              f"{m['combined_detection_and_identification_rate']['rate']:>7.2f} "
              f"{(m['forced_identification_accuracy']['rate'] or 0):>7.2f} "
              f"{c['coherence_injected']['rate']:>8.2f}")
    b = results["best_cell"]
    print(f"best cell (gap): layer {b['layer']} {b['kind']} {b['value']:g}; paper (27B, layer "
          f"37/62, strength 4): detection 0.41, false alarms 0.00, detection+id 0.23")
    if "controls" in results:
        c = results["controls"]
        if "random" in c:
            print(f"random norm-matched: gap diff {c['random']['gap_difference']:.3f}, detection "
                  f"{c['random']['metrics']['detection_hit_rate']['rate']:.2f}")
        yb = c["yes_bias"]
        print(f"yes-bias: gap on unrelated questions {yb['gap_clean']:.3f} -> "
              f"{yb['gap_injected']:.3f} (shift {yb['shift']:+.3f})")
        for name, v in c["variants"].items():
            print(f"  variant {name}: detection {v['metrics']['detection_hit_rate']['rate']:.2f}, "
                  f"FA {v['metrics']['detection_false_alarm_rate']['rate']:.2f}, gap diff "
                  f"{v['gap_difference']:.3f}")
    if "mechanism" in results and "top_components" in results["mechanism"]:
        m = results["mechanism"]
        print("mechanism, top components by exact ablation: " + ", ".join(
            f"{t['family']}{t['layer']} {t['ablation']:+.3f}" for t in m["top_components"]))
        print(f"  agreement with exact ablation (Pearson): {m['pearson_with_exact_ablation']}")
        print(f"  evidence carriers: {m['evidence']['n_monotone']} monotone neurons at layer "
              f"{m['evidence']['layer']}")
        if "latents" in m:
            lat = m["latents"]
            for h, p in lat["per_sae"].items():
                print(f"  SAE {h} (FVE {lat['saes'][h]['quality']['fve']:.2f}): AtP latents "
                      f"{p['atp_sum']:+.3f}, error {p['error_atp']:+.3f}; top latents by |AtP| " + ", ".join(
                    f"{t['latent']} atp {t['atp']:+.3f} exact {t['exact']:+.3f}"
                    for t in p["top_atp"] if t["exact"] is not None))
            print(f"  gate latents: {[(g['latent'], round(g['push_control'], 3)) for g in lat['gates'][:5]]}")
            print(f"  evidence latents: {lat['evidence']['n_monotone']} of "
                  f"{lat['evidence']['n_latents']} monotone at {lat['sites']['evidence']}")
    if "trained_bias" in results:
        tb = results["trained_bias"]
        print(f"trained bias at layer {tb['meta_layer']}: loss {tb['loss_first']:.3f} -> "
              f"{tb['loss_last']:.3f}, |b| {tb['bias_norm']:.2f}")
        for layer, v in tb["per_layer"].items():
            b, a = v["before"]["metrics"], v["after"]["metrics"]
            print(f"  layer {layer}: detection {b['detection_hit_rate']['rate']:.2f} -> "
                  f"{a['detection_hit_rate']['rate']:.2f}, FA "
                  f"{b['detection_false_alarm_rate']['rate']:.2f} -> "
                  f"{a['detection_false_alarm_rate']['rate']:.2f}, det+id "
                  f"{b['combined_detection_and_identification_rate']['rate']:.2f} -> "
                  f"{a['combined_detection_and_identification_rate']['rate']:.2f}, gap diff "
                  f"{v['before']['gap_difference']:.3f} -> {v['after']['gap_difference']:.3f}")
    t = results["timings_s"]
    print(f"time: {t['total']:.0f} s")
