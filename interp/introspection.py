"""The injected-thought protocol (Lindsey 2025; Macar et al. 2026, arXiv 2603.21396): concept
vectors, the detection dialogue, injection from a marked token on, the trials and their
metrics, the Yes-No logit gap, coherence, norm-relative strengths, and a trained bias.

**Concept vectors.** For a word `w`, the `blocks.L.hook_resid_post` activation at the last token
of "Tell me about {w}" (chat-formatted with the generation prompt, or the plain
"User: ... / Assistant:" format for a base model), minus the mean of the same activation over
the baseline words; at every layer asked for, unnormalised (`concept_vectors`). The norm of the
vector grows with depth like the residual stream itself, so a raw strength means something
different at every layer and in every model: `residual_norm` gives the typical norm of the
residual stream at a layer (median over the dialogue's token positions, the first one left
out: its norm is an outlier in most models) and `relative_strength` the ratio
`strength * |v| / typical norm`, which is what transfers between models.

**The dialogue** (`PromptTemplate`, read from `introspection_prompt_templates.json`): the
researcher's preamble, the assistant's "Ok.", then "Trial {n}: Do you detect an injected
thought? ...". The vector is added as `h += strength * v` at `resid_post` of layer L from the
token before "Trial {n}" (`injection_marker`) through every generated token; control trials are
the same dialogue without injection, forced-identification trials prefill the answer with
`FORCED_PREFILL`. One `interp.hooks.steer` per injected vector does the adding:
`generate_with(..., start=marker)` places it per row under left padding, and for forward passes
over rows that carry *different* vectors (`injection_hooks`) there is one steer per distinct
vector whose per-row `from_position` leaves every other row alone.

**Measures.** The rule-based grader `interp.judges.judge_introspection` gives the paper's metric
names with Wilson intervals (`trial_metrics`). At any scale, `yes_no_gap` is the continuous
measure `logsumexp(Yes tokens) - logsumexp(No tokens)` at the first answer token
(`interp.attribution.LogSumExpDiff`), compared between injection and control. Coherence
(`completion_perplexity`, `coherent`) flags completions that are broken text, so that
"detections" made of noise are visible.

**Trained bias** (the paper's experiment 14): one learnable vector added to the MLP output of
one meta-layer (`blocks.M.mlp.b_out`, which TransformerLens MLPs carry; everything else frozen)
trained with cross-entropy on injected trials (target "Yes, I detect an injected thought. The
injected word is "{concept}"") and control trials (target "No, I don't detect any injected
thought"). `train_bias` runs the small loop itself because each row of a batch carries its own
injection (vector, layer, strength), which the generic `interp.training.train` loop cannot
attach per row.

Caveats: the rule-based grader is not the paper's LLM judge (see `interp.judges.introspection`);
the Yes/No token sets are the single-token spellings the tokenizer has ("Yes", " Yes", "yes",
...), so a model that answers "I ..." is measured by a gap it never acts on; with greedy
decoding every trial of one concept and trial number is the same text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp import hooks as H
from interp.attribution.metrics import LogSumExpDiff
from interp.data import data_file
from interp.generation import (
    Marker,
    dialogue,
    generate_with,
    last_position_logits,
    left_pad,
    pad_id,
    resolve_start,
    token_lists,
)
from interp.judges.base import Rate
from interp.judges.introspection import (
    FORCED_PREFILL,
    IntrospectionTrial,
    is_degenerate,
    judge_introspection,
)
from interp.training.data import Example, collate

__all__ = [
    "DETECT_TARGET",
    "FORCED_PREFILL",
    "METRIC_NAMES",
    "NO_TARGET",
    "YES_NO_QUESTIONS",
    "BiasResult",
    "ConceptSet",
    "Injection",
    "PromptTemplate",
    "TrialResults",
    "answer_stops",
    "attribution_effects",
    "bias_example",
    "coherence_rate",
    "coherent",
    "component_effects",
    "evidence_latents",
    "evidence_neurons",
    "gate_latents",
    "gate_neurons",
    "latent_ablation_effects",
    "latent_attributions",
    "last_token_resid",
    "target_cross_entropy",
    "completion_perplexity",
    "concept_prompt",
    "concept_vectors",
    "control_trials",
    "injected_trials",
    "injection_hooks",
    "injection_marker",
    "load_concepts",
    "load_templates",
    "prompt_format",
    "question_prompt",
    "random_like",
    "relative_strength",
    "residual_norm",
    "train_bias",
    "trial_metrics",
    "trial_prompt",
    "yes_no_gap",
    "yes_no_tokens",
]

#: The paper's metric names, each reported with a 95% Wilson interval.
METRIC_NAMES = ("detection_hit_rate", "detection_false_alarm_rate",
                "identification_accuracy_given_claim", "combined_detection_and_identification_rate",
                "forced_identification_accuracy")
#: Training targets of the trained bias (the paper's experiment 14).
DETECT_TARGET = 'Yes, I detect an injected thought. The injected word is "{concept}"'
NO_TARGET = "No, I don't detect any injected thought"
#: Unrelated yes/no questions for the yes-bias control (answer: True for yes).
YES_NO_QUESTIONS: tuple[tuple[str, bool], ...] = (
    ("Is the sky blue on a clear day? Answer yes or no.", True),
    ("Is water wet? Answer yes or no.", True),
    ("Do cats have four legs? Answer yes or no.", True),
    ("Is Paris in France? Answer yes or no.", True),
    ("Is two plus two equal to four? Answer yes or no.", True),
    ("Is the sun cold? Answer yes or no.", False),
    ("Can fish climb trees? Answer yes or no.", False),
    ("Is ice hotter than fire? Answer yes or no.", False),
    ("Is London in Japan? Answer yes or no.", False),
    ("Is three plus three equal to ten? Answer yes or no.", False),
)
Format = Literal["template", "plain"]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptSet:
    """The concept lists of `introspection_concepts.json`.

    Attributes:
        test: the 50 test concepts of the paper's sweeps.
        baseline: the 100 baseline words whose mean activation is subtracted.
        extra: the 450 further concepts (training and held-out pool of the trained bias).
        source: where the lists come from.
    """

    test: tuple[str, ...]
    baseline: tuple[str, ...]
    extra: tuple[str, ...]
    source: str = ""

    def split(self, n_train: int = 400, n_held_out: int = 100, seed: int = 42
              ) -> tuple[list[str], list[str]]:
        """A seeded split of `extra` into training and held-out concepts (the paper: 400 / 100,
        seed 42). Raises ValueError when more are asked than there are."""
        if n_train + n_held_out > len(self.extra):
            raise ValueError(f"asked for {n_train} training + {n_held_out} held-out concepts, but "
                             f"there are only {len(self.extra)}; lower --bias-train-concepts")
        order = torch.randperm(len(self.extra), generator=torch.Generator().manual_seed(seed))
        words = [self.extra[i] for i in order.tolist()]
        return words[:n_train], words[n_train:n_train + n_held_out]


def load_concepts() -> ConceptSet:
    """Read `introspection/introspection_concepts.json` from the data directory."""
    raw = json.loads(data_file("introspection/introspection_concepts.json").read_text())
    return ConceptSet(tuple(raw["test_concepts_50"]["values"]),
                      tuple(raw["baseline_words_100"]["values"]),
                      tuple(raw["new_concepts_450"]["values"]), raw.get("_source", ""))


@dataclass(frozen=True)
class PromptTemplate:
    """One variant of the detection dialogue.

    Attributes:
        name: the variant's name (`ORIGINAL`, `SKEPTICAL`, ...).
        user_turn1: the researcher's preamble.
        assistant_turn1: the assistant's reply ("Ok.").
        user_turn2: the question, with `{trial_num}`.
        system: a system message ("" for none).
    """

    name: str
    user_turn1: str
    assistant_turn1: str
    user_turn2: str
    system: str = ""

    def turns(self, trial: int) -> list[str]:
        """The three turns of trial `trial`."""
        return [self.user_turn1, self.assistant_turn1, self.user_turn2.format(trial_num=trial)]


def load_templates() -> dict[str, PromptTemplate]:
    """The prompt variants of `introspection_prompt_templates.json` that need no extra field
    (`ANTI_REWARD`, which needs a penalised category, is left out)."""
    raw = json.loads(data_file("introspection/introspection_prompt_templates.json").read_text())
    out = {}
    for name, t in raw["templates"].items():
        texts = (t["user_turn1"], t["assistant_turn1"], t["user_turn2_template"])
        if any("{category}" in x for x in texts):
            continue
        out[name] = PromptTemplate(name, *texts, system=t.get("system_prompt", ""))
    return out


def prompt_format(model: HookedTransformer) -> Format:
    """`"template"` for a tokenizer with a chat template, else `"plain"` (base models, as the
    paper runs them: "User: ... / Assistant: ...")."""
    tok = model.tokenizer
    return "template" if tok is not None and getattr(tok, "chat_template", None) else "plain"


def trial_prompt(model: HookedTransformer, template: PromptTemplate, trial: int,
                 prefill: str | None = None, format: Format | None = None) -> str:
    """The dialogue of trial `trial` as text, ending where the assistant answers (after
    `prefill` when given)."""
    return dialogue(model, template.turns(trial), prefill=prefill,
                    system=template.system or None, format=format or prompt_format(model))


def injection_marker(trial: int) -> Marker:
    """The injection start: the token before the one where "Trial {trial}" begins."""
    return Marker(f"Trial {trial}", offset=-1)


def question_prompt(model: HookedTransformer, question: str, format: Format | None = None) -> str:
    """A one-turn dialogue asking `question` (the yes-bias control)."""
    return dialogue(model, [question], format=format or prompt_format(model))


def concept_prompt(model: HookedTransformer, word: str, format: Format | None = None) -> str:
    """'Tell me about {word}' as a one-turn dialogue with the generation prompt."""
    return dialogue(model, [f"Tell me about {word}"], format=format or prompt_format(model))


# --------------------------------------------------------------------------------------------
# Concept vectors and norms
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def last_token_resid(model: HookedTransformer, prompts: Sequence[str], layers: Sequence[int],
                     batch_size: int = 16) -> Float[Tensor, "layer n d_model"]:
    """`blocks.L.hook_resid_post` at the last token of each prompt (left-padded batches, so
    the last position is every prompt's last token), float32 on the CPU."""
    names = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    rows = token_lists(model, list(prompts))
    out = []
    stop = max(layers) + 1
    for first in range(0, len(rows), batch_size):
        tokens, mask = left_pad(rows[first:first + batch_size], pad_id(model), model.cfg.device)
        with H.capture(model, names) as got:
            model(tokens, attention_mask=mask, stop_at_layer=stop)
        out.append(torch.stack([got[n][:, -1].float().cpu() for n in names]))
    return torch.cat(out, dim=1)


def concept_vectors(model: HookedTransformer, words: Sequence[str], baseline: Sequence[str],
                    layers: Sequence[int], batch_size: int = 16
                    ) -> Float[Tensor, "layer concept d_model"]:
    """Concept vectors: each word's last-token `resid_post` of "Tell me about {word}" minus the
    mean over the `baseline` words, at each of `layers` (unnormalised)."""
    if not words or not baseline:
        raise ValueError("concept_vectors needs at least one word and one baseline word")
    fmt = prompt_format(model)
    acts = last_token_resid(model, [concept_prompt(model, w, fmt) for w in words], layers,
                            batch_size)
    base = last_token_resid(model, [concept_prompt(model, w, fmt) for w in baseline], layers,
                            batch_size)
    return acts - base.mean(dim=1, keepdim=True)


@torch.no_grad()
def residual_norm(model: HookedTransformer, prompt: str, layers: Sequence[int]
                  ) -> Float[Tensor, " layer"]:
    """The typical `resid_post` norm at each layer: the median over the prompt's token
    positions, the first position left out (its norm is an outlier in most models)."""
    names = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    tokens = torch.tensor(token_lists(model, [prompt]), device=model.cfg.device)
    with H.capture(model, names) as got:
        model(tokens, stop_at_layer=max(layers) + 1)
    return torch.stack([got[n][0, 1:].float().norm(dim=-1).median().cpu() for n in names])


def relative_strength(strength: float, vector_norm: float, resid_norm: float) -> float:
    """`strength * |v| / typical residual norm`: the size of the addition relative to the
    residual stream it is added to."""
    return float(strength * vector_norm / resid_norm)


def random_like(vectors: Float[Tensor, "n d"], seed: int = 0) -> Float[Tensor, "n d"]:
    """Gaussian random directions with each row's norm (the norm-matched random control)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(vectors.shape, generator=g, dtype=torch.float32)
    return (r / r.norm(dim=-1, keepdim=True) * vectors.float().norm(dim=-1, keepdim=True)).to(
        vectors.dtype)


# --------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Injection:
    """`h += strength * vector` at `blocks.{layer}.hook_resid_post`.

    Attributes:
        vector: `[d_model]`.
        layer: the injection layer.
        strength: the multiplier.
    """

    vector: Tensor
    layer: int
    strength: float

    def hook(self, model: HookedTransformer, from_position: H.FromPosition = None) -> H.Steer:
        return H.steer(model, self.vector, layers=[self.layer], scale=self.strength,
                       hook="resid_post", from_position=from_position)


def injection_hooks(model: HookedTransformer, injections: Sequence[Injection | None],
                    starts: Sequence[int | None]) -> list[H.Steer]:
    """Steer hooks for a batch whose rows carry their own injection (None: a control row).

    Rows whose injection is the same object share one hook; each hook's per-row
    `from_position` is the row's start for its own rows and None elsewhere, so a row is touched
    only by its own injection, from `starts[row]` (a position in the frame the model sees) on.
    """
    if len(injections) != len(starts):
        raise ValueError(f"{len(injections)} injections for {len(starts)} starts; give one each")
    groups: dict[int, list[int]] = {}
    for row, inj in enumerate(injections):
        if inj is not None:
            if starts[row] is None:
                raise ValueError(f"row {row} has an injection but no start")
            groups.setdefault(id(inj), []).append(row)
    out = []
    for rows in groups.values():
        per_row = tuple(starts[r] if r in rows else None for r in range(len(starts)))
        out.append(injections[rows[0]].hook(model, from_position=per_row))
    return out


def yes_no_tokens(model: HookedTransformer) -> tuple[list[int], list[int]]:
    """Single-token spellings of Yes and No the tokenizer has ("Yes", " Yes", "yes", " yes",
    "YES", " YES"; the same for No)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("yes_no_tokens needs a model with a tokenizer")

    def ids(word: str) -> list[int]:
        found = []
        for w in (word, " " + word, word.lower(), " " + word.lower(), word.upper(),
                  " " + word.upper()):
            t = tok.encode(w, add_special_tokens=False)
            if len(t) == 1 and t[0] not in found:
                found.append(t[0])
        return found

    yes, no = ids("Yes"), ids("No")
    if not yes or not no:
        raise ValueError("the tokenizer has no single-token Yes or No")
    return yes, no


def _rows_and_starts(model: HookedTransformer, prompts: Sequence[str],
                     markers: Sequence[Marker | int | None]) -> tuple[list[list[int]], list]:
    rows = token_lists(model, list(prompts))
    starts = [resolve_start(model, p, r, m) for p, r, m in zip(prompts, rows, markers)]
    return rows, starts


def yes_no_gap(model: HookedTransformer, prompts: Sequence[str],
               injections: Sequence[Injection | None] | None = None,
               markers: Sequence[Marker | int | None] | None = None,
               batch_size: int = 16) -> Float[Tensor, " n"]:
    """`logsumexp(Yes) - logsumexp(No)` at the first answer token of each prompt, with each
    row's injection acting from its marker on (None: a control row).

    The prompts are left-padded, so each row's start is moved into the padded frame.
    """
    n = len(prompts)
    injections = list(injections) if injections is not None else [None] * n
    markers = list(markers) if markers is not None else [None] * n
    if not len(injections) == len(markers) == n:
        raise ValueError(f"{n} prompts, {len(injections)} injections and {len(markers)} "
                         "markers: give one of each per prompt")
    yes, no = yes_no_tokens(model)
    metric = LogSumExpDiff([yes], [no])
    rows, starts = _rows_and_starts(model, prompts, markers)
    out = []
    with torch.no_grad():
        for first in range(0, n, batch_size):
            chunk = list(range(first, min(n, first + batch_size)))
            tokens, mask = left_pad([rows[i] for i in chunk], pad_id(model), model.cfg.device)
            width = tokens.shape[1]
            frame = [None if starts[i] is None else width - len(rows[i]) + starts[i] for i in chunk]
            hooks = injection_hooks(model, [injections[i] for i in chunk], frame)
            with model.hooks(fwd_hooks=[fh for h in hooks for fh in h.fwd_hooks()]):
                resid = model(tokens, attention_mask=mask, stop_at_layer=model.cfg.n_layers)
            out.append(metric(last_position_logits(model, resid).float()).cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------


@dataclass
class TrialResults:
    """Graded trials of one setting.

    Attributes:
        trials: the `IntrospectionTrial`s (injection, control or forced).
        trial_numbers: the trial number of each.
        perplexity: per trial, the completion's perplexity under the unhooked model.
    """

    trials: list[IntrospectionTrial] = field(default_factory=list)
    trial_numbers: list[int] = field(default_factory=list)
    perplexity: list[float] = field(default_factory=list)

    def __add__(self, other: TrialResults) -> TrialResults:
        return TrialResults(self.trials + other.trials, self.trial_numbers + other.trial_numbers,
                            self.perplexity + other.perplexity)


def answer_stops(model: HookedTransformer) -> list[str] | None:
    """Stop strings of an answer: the next "User:" turn in the plain format (a base model runs
    on into a made-up dialogue otherwise); None with a chat template (its end-of-turn token
    stops generation)."""
    return ["\nUser:"] if prompt_format(model) == "plain" else None


def _generate(model: HookedTransformer, prompts: list[str], hooks: list[H.Hook],
              markers: list[Marker] | None, max_new_tokens: int, temperature: float, seed: int,
              batch_size: int | None) -> list[str]:
    gen = generate_with(model, prompts, hooks=hooks, max_new_tokens=max_new_tokens,
                        start=markers, temperature=temperature, seed=seed,
                        batch_size=batch_size, stop_strings=answer_stops(model), progress=False)
    assert gen.texts is not None
    return gen.texts


def injected_trials(model: HookedTransformer, template: PromptTemplate, concept: str,
                    injection: Injection, trials: Sequence[int], forced: Sequence[int] = (),
                    max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0,
                    batch_size: int | None = None, perplexity: bool = True) -> TrialResults:
    """Injection trials (numbers `trials`) and forced-identification trials (numbers
    `forced`, answer prefilled with `FORCED_PREFILL`) of one concept, generated in one batch
    with the injection acting from each row's marker on."""
    fmt = prompt_format(model)
    prompts = [trial_prompt(model, template, t, format=fmt) for t in trials]
    prompts += [trial_prompt(model, template, t, prefill=FORCED_PREFILL, format=fmt)
                for t in forced]
    numbers = list(trials) + list(forced)
    texts = _generate(model, prompts, [injection.hook(model)],
                      [injection_marker(t) for t in numbers], max_new_tokens, temperature, seed,
                      batch_size)
    kinds = ["injection"] * len(trials) + ["forced"] * len(forced)
    items = [IntrospectionTrial(x, concept, k, p) for x, k, p in zip(texts, kinds, prompts)]
    ppl = completion_perplexity(model, prompts, texts) if perplexity else [math.nan] * len(texts)
    return TrialResults(items, numbers, ppl)


def control_trials(model: HookedTransformer, template: PromptTemplate, trials: Sequence[int],
                   samples: int = 1, max_new_tokens: int = 40, temperature: float = 1.0,
                   seed: int = 0, batch_size: int | None = None, perplexity: bool = True
                   ) -> TrialResults:
    """Control trials: the same dialogues without injection, `samples` completions each (with
    sampling; distinct seeds per sample)."""
    fmt = prompt_format(model)
    base = [trial_prompt(model, template, t, format=fmt) for t in trials]
    prompts = [p for p in base for _ in range(samples)]
    numbers = [t for t in trials for _ in range(samples)]
    gen = generate_with(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed, batch_size=batch_size, stop_strings=answer_stops(model),
                        progress=False)
    assert gen.texts is not None
    items = [IntrospectionTrial(x, None, "control", p) for x, p in zip(gen.texts, prompts)]
    ppl = completion_perplexity(model, prompts, gen.texts) if perplexity else [math.nan] * len(prompts)
    return TrialResults(items, numbers, ppl)


def trial_metrics(results: TrialResults) -> dict[str, dict[str, Any]]:
    """The paper's metrics (`METRIC_NAMES`, plus detection accuracy) with Wilson 95% intervals,
    graded by the rule-based judge."""
    judged = judge_introspection(results.trials)
    return {k: r.to_dict() for k, r in judged.rates.items()}


# --------------------------------------------------------------------------------------------
# Coherence
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def completion_perplexity(model: HookedTransformer, prompts: Sequence[str],
                          completions: Sequence[str], batch_size: int = 8) -> list[float]:
    """Per completion, `exp(mean NLL)` of its tokens after its prompt under the model as it is
    (call it without injection hooks: fluency judged by the unhooked model). An empty
    completion gives NaN."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("completion_perplexity needs a tokenizer")
    examples, empty = [], []
    for p, c in zip(prompts, completions):
        head = token_lists(model, [p])[0]
        tail = tok.encode(c, add_special_tokens=False)
        empty.append(not tail)
        tail = tail or [pad_id(model)]
        examples.append(Example(head + tail, [False] * len(head) + [True] * len(tail)))
    out: list[float] = []
    for first in range(0, len(examples), batch_size):
        batch = collate(examples[first:first + batch_size], model.cfg.device)
        logits = model(batch.tokens, attention_mask=batch.attention_mask).float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
        mask = batch.loss_mask[:, 1:].float()
        nll = -(logp * mask).sum(-1) / mask.sum(-1)
        out += nll.exp().cpu().tolist()
    return [math.nan if e else v for v, e in zip(out, empty)]


def coherent(text: str, perplexity: float, max_perplexity: float = 200.0) -> bool:
    """Fluent: not degenerate (`interp.judges.introspection.is_degenerate`) and a perplexity
    under the unhooked model of at most `max_perplexity` (an empty answer is not fluent)."""
    return bool(text.strip()) and not is_degenerate(text) and (
        not math.isnan(perplexity) and perplexity <= max_perplexity)


def coherence_rate(results: TrialResults, max_perplexity: float = 200.0) -> dict[str, Any]:
    """The share of fluent completions (`coherent`) with its Wilson interval."""
    flags = [coherent(t.completion, p, max_perplexity)
             for t, p in zip(results.trials, results.perplexity)]
    return Rate.of(flags).to_dict()


# --------------------------------------------------------------------------------------------
# The trained introspection bias
# --------------------------------------------------------------------------------------------


@dataclass
class BiasResult:
    """A trained bias.

    Attributes:
        layer: the meta-layer whose MLP output it is added to.
        bias: the learned vector `[d_model]` (what was added to `b_out`).
        losses: the loss of every step.
    """

    layer: int
    bias: Tensor
    losses: list[float]

    def hook(self, model: HookedTransformer) -> H.Steer:
        """The bias as a hook: add it to `blocks.{layer}.hook_mlp_out` at every position."""
        return H.steer(model, self.bias, layers=[self.layer], hook="mlp_out")


def bias_example(model: HookedTransformer, prompt: str, target: str, marker: Marker
                 ) -> tuple[Example, int]:
    """The prompt plus `target` as an `Example` (loss on the target) and the marker's index."""
    head = token_lists(model, [prompt])[0]
    tail = model.tokenizer.encode(target, add_special_tokens=False)
    start = resolve_start(model, prompt, head, marker)
    assert start is not None
    return Example(head + tail, [False] * len(head) + [True] * len(tail)), start


def target_cross_entropy(model: HookedTransformer, resid: Float[Tensor, "batch pos d_model"],
                         batch: Any) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy over the target tokens of `batch` (its `loss_mask`), from
    the final residual stream: only the positions that predict a target go through the final
    norm and the unembedding (the same number as `interp.training.cross_entropy` on the full
    logits, without the `[batch, pos, d_vocab]` tensor)."""
    rows, cols = torch.nonzero(batch.loss_mask[:, 1:], as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("the batch has no target tokens (its loss mask is empty)")
    picked = resid[rows, cols][:, None]
    if model.cfg.normalization_type is not None:
        picked = model.ln_final(picked)
    logits = model.unembed(picked)[:, 0].float()
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return torch.nn.functional.cross_entropy(logits, batch.tokens[rows, cols + 1])


def train_bias(model: HookedTransformer, layer: int,
               examples: Sequence[tuple[Example, int, Injection | None]], steps: int = 100,
               lr: float = 1e-2, batch_size: int = 4, seed: int = 42,
               weight_decay: float = 0.0) -> BiasResult:
    """Train one bias vector on the MLP output of `layer`, every weight frozen.

    The bias is a leaf `[d_model]` tensor added through an `interp.hooks.steer` at
    `blocks.{layer}.hook_mlp_out` (the same as adding it to `b_out`). Each step draws
    `batch_size` examples (seeded), right-pads them (`interp.training.collate`), attaches each
    row's injection from its start (`injection_hooks`) and takes an AdamW step on the
    cross-entropy of the targets (`target_cross_entropy`).

    Args:
        examples: `(example, start, injection or None)` triples, e.g. from `bias_example`.
    """
    if not examples:
        raise ValueError("train_bias needs at least one example")
    bias = torch.zeros(model.cfg.d_model, device=model.cfg.device, requires_grad=True)
    opt = torch.optim.AdamW([bias], lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    losses = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _ in range(steps):
            pick = torch.randint(len(examples), (min(batch_size, len(examples)),), generator=g)
            chosen = [examples[i] for i in pick.tolist()]
            batch = collate([c[0] for c in chosen], model.cfg.device)
            hooks = injection_hooks(model, [c[2] for c in chosen], [c[1] for c in chosen])
            add = H.steer(model, bias, layers=[layer], hook="mlp_out")
            with model.hooks(fwd_hooks=[fh for h in [*hooks, add] for fh in h.fwd_hooks()]):
                resid = model(batch.tokens, attention_mask=batch.attention_mask,
                              stop_at_layer=model.cfg.n_layers)
            loss = target_cross_entropy(model, resid, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return BiasResult(layer, bias.detach().clone(), losses)


# --------------------------------------------------------------------------------------------
# The mechanism
# --------------------------------------------------------------------------------------------


def _same_prompt_batch(model: HookedTransformer, prompt: str, marker: Marker,
                       injections: Sequence[Injection]) -> tuple[Tensor, list[H.Steer]]:
    """One prompt repeated once per injection (no padding), and the injections' hooks."""
    ids = token_lists(model, [prompt])[0]
    start = resolve_start(model, prompt, ids, marker)
    tokens = torch.tensor([ids] * len(injections), device=model.cfg.device)
    return tokens, injection_hooks(model, list(injections), [start] * len(injections))


def _gap_metric(model: HookedTransformer) -> LogSumExpDiff:
    yes, no = yes_no_tokens(model)
    return LogSumExpDiff([yes], [no])


def _mean_gap(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], metric: LogSumExpDiff,
              fwd_hooks: list) -> float:
    """The Yes - No gap at the last position, averaged over rows, under `fwd_hooks`."""
    with model.hooks(fwd_hooks=fwd_hooks):
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    return float(metric(last_position_logits(model, resid).float()).mean())


def component_effects(model: HookedTransformer, prompt: str, marker: Marker,
                      injections: Sequence[Injection], layers: Sequence[int]
                      ) -> dict[str, Any]:
    """Exact patching of each attention and MLP output of `layers` on the Yes-No gap.

    Rows: `prompt` once per injection (e.g. one per concept, all at one layer and strength).
    For each component, with `interp.hooks.patch`:

    - *ablation*: the injected run with that component's output taken from the control run;
      the effect is `gap(injected) - gap(patched)`, the part of the injection's effect on the
      gap that needs this component (mean over rows);
    - *knock-in*: the control run with that output taken from the injected run; the effect is
      `gap(patched) - gap(control)`, what this component alone carries.

    Returns a dict with `gap_injected`, `gap_control` (means) and per family (`attn`, `mlp`)
    lists `ablation` and `knock_in` over `layers`.
    """
    metric = _gap_metric(model)
    tokens, inj_hooks = _same_prompt_batch(model, prompt, marker, injections)
    names = {fam: [f"blocks.{layer}.hook_{fam}_out" for layer in layers] for fam in ("attn", "mlp")}
    every = [n for ns in names.values() for n in ns]
    inj_fwd = [fh for h in inj_hooks for fh in h.fwd_hooks()]

    def gap(fwd: list) -> float:
        return _mean_gap(model, tokens, metric, fwd)

    with torch.no_grad():
        with model.hooks(fwd_hooks=inj_fwd):
            _, inj_cache = model.run_with_cache(tokens, names_filter=lambda n: n in every)
        _, ctrl_cache = model.run_with_cache(tokens, names_filter=lambda n: n in every)
        base_inj, base_ctrl = gap(inj_fwd), gap([])
        out: dict[str, Any] = {"layers": list(layers), "gap_injected": base_inj,
                               "gap_control": base_ctrl}
        for fam, ns in names.items():
            ablation, knock = [], []
            for n in ns:
                ablation.append(base_inj - gap(inj_fwd + H.patch(model, ctrl_cache, n, layers=None)
                                               .fwd_hooks()))
                knock.append(gap(H.patch(model, inj_cache, n, layers=None).fwd_hooks()) - base_ctrl)
            out[fam] = {"ablation": ablation, "knock_in": knock}
    return out


def _attributions(model: HookedTransformer, tokens: Tensor, inj_fwd: list, names: Sequence[str],
                  rules: Any = None) -> dict[str, Tensor]:
    """Per hook name, the first-order estimate of replacing the injected activation by the
    control one, `-(control - injected) . grad` with the gradient of the mean Yes-No gap in
    the injected run (AtP; RelP when `rules` is an `LRPRules`), summed over rows and positions
    (the gradient is of the gap's mean over rows, so this estimates the change of that mean):
    a tensor of the activation's trailing shape (`[d_model]`, `[n_heads, d_head]`, `[d_sae]`)."""
    from interp.attribution.atp import activation_grads
    from interp.attribution.lrp import lrp_rules

    metric = _gap_metric(model)
    with torch.no_grad():
        _, ctrl_cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    if rules is None:
        acts, grads, _ = activation_grads(model, tokens, metric, names, fwd_hooks=inj_fwd)
    else:
        with lrp_rules(model, rules):
            acts, grads, _ = activation_grads(model, tokens, metric, names, fwd_hooks=inj_fwd)
    return {n: -((ctrl_cache[n] - acts[n]) * grads[n]).float().sum(dim=(0, 1)) for n in names}


def attribution_effects(model: HookedTransformer, prompt: str, marker: Marker,
                        injections: Sequence[Injection], layers: Sequence[int],
                        rules: Any = None) -> dict[str, Any]:
    """First-order estimates of the ablation effects of `component_effects`, plus heads.

    The gradient of the mean Yes-No gap is taken in the injected run
    (`interp.attribution.atp.activation_grads`); the estimate for a site is
    `-(control - injected) . grad`, summed over positions and features and over rows (AtP).
    With `rules` (an `interp.attribution.LRPRules`) the backward pass follows those LRP
    rules (`lrp_rules`), which is RelP. Heads are read at `attn.hook_z`.

    Returns per family (`attn`, `mlp`: `[layer]`; `heads`: `[layer][head]`) lists.
    """
    tokens, inj_hooks = _same_prompt_batch(model, prompt, marker, injections)
    names = {"attn": [f"blocks.{layer}.hook_attn_out" for layer in layers],
             "mlp": [f"blocks.{layer}.hook_mlp_out" for layer in layers],
             "heads": [f"blocks.{layer}.attn.hook_z" for layer in layers]}
    every = [n for ns in names.values() for n in ns]
    contrib = _attributions(model, tokens, [fh for h in inj_hooks for fh in h.fwd_hooks()],
                            every, rules)
    out: dict[str, Any] = {"layers": list(layers)}
    for fam, ns in names.items():
        out[fam] = [contrib[n].sum(-1).tolist() if fam == "heads" else float(contrib[n].sum())
                    for n in ns]
    return out


def latent_attributions(model: HookedTransformer, prompt: str, marker: Marker,
                        injections: Sequence[Injection], latent_names: Sequence[str],
                        rules: Any = None) -> dict[str, Float[Tensor, " d_sae"]]:
    """AtP (or, with `rules`, RelP) estimates of each SAE latent's ablation effect on the
    Yes-No gap: for every latent hook name (`interp.saes.latent_hook_name`, SAEs attached with
    their error term so the model's output is unchanged) the estimate of
    `gap(injected) - gap(injected, that latent at its control value)` (the gap averaged over
    rows, as in `attribution_effects`). Check the largest against `latent_ablation_effects`."""
    tokens, inj_hooks = _same_prompt_batch(model, prompt, marker, injections)
    return _attributions(model, tokens, [fh for h in inj_hooks for fh in h.fwd_hooks()],
                         list(latent_names), rules)


def latent_ablation_effects(model: HookedTransformer, prompt: str, marker: Marker,
                            injections: Sequence[Injection], latent_name: str,
                            latents: Sequence[int]) -> list[float]:
    """Exact ablation of single SAE latents: for each latent, `gap(injected) -
    gap(injected, that latent set to its control-run value at every position)`, the gap
    averaged over rows (what `latent_attributions` estimates). With the SAE's error term, moving one latent
    moves the SAE's output by exactly that latent's decoder row times the change."""
    metric = _gap_metric(model)
    tokens, inj_hooks = _same_prompt_batch(model, prompt, marker, injections)
    inj_fwd = [fh for h in inj_hooks for fh in h.fwd_hooks()]

    def gap(fwd: list) -> float:
        return _mean_gap(model, tokens, metric, fwd)

    with torch.no_grad():
        _, ctrl = model.run_with_cache(tokens, names_filter=latent_name)
        control = ctrl[latent_name]
        base = gap(inj_fwd)
        out = []
        for j in latents:
            def put(act: Tensor, hook: Any, j: int = j) -> Tensor:
                act = act.clone()
                act[..., j] = control[..., j]
                return act
            out.append(base - gap(inj_fwd + [(latent_name, put)]))
    return out


def _gate_rows(direct: Tensor, a_ctrl: Tensor, a_inj: Tensor, top: int) -> list[dict[str, Any]]:
    """The `top` units with the most negative `direct * a_ctrl` (negative ones only)."""
    push = direct * a_ctrl
    return [{"index": k, "direct_effect": float(direct[k]), "act_control": float(a_ctrl[k]),
             "act_injected": float(a_inj[k]), "push_control": float(push[k]),
             "push_change": float(direct[k] * (a_inj[k] - a_ctrl[k]))}
            for k in torch.argsort(push)[:top].tolist() if push[k] < 0]


def _gate_candidates(model: HookedTransformer, prompt: str, marker: Marker,
                     injections: Sequence[Injection], writers: dict[str, Tensor], top: int
                     ) -> list[dict[str, Any]]:
    """Gate rows over `writers` (`{activation hook name: [units, d_model] output directions}`),
    the `top` of all of them by push, each with its hook name as `site`."""
    yes, no = yes_no_tokens(model)
    direction = (model.W_U[:, yes].mean(1) - model.W_U[:, no].mean(1)).detach().float()
    tokens, inj_hooks = _same_prompt_batch(model, prompt, marker, injections)
    names = list(writers)
    with torch.no_grad():
        _, ctrl = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        with model.hooks(fwd_hooks=[fh for h in inj_hooks for fh in h.fwd_hooks()]):
            _, inj = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    rows = []
    for n, w in writers.items():
        direct = w.detach().float() @ direction
        rows += [{"site": n, **r} for r in _gate_rows(direct, ctrl[n][:, -1].float().mean(0),
                                                      inj[n][:, -1].float().mean(0), top)]
    rows.sort(key=lambda r: r["push_control"])
    return rows[:top]


def gate_neurons(model: HookedTransformer, prompt: str, marker: Marker,
                 injections: Sequence[Injection], layers: Sequence[int], top: int = 10
                 ) -> list[dict[str, Any]]:
    """"Gate" candidates among MLP neurons of `layers`: neurons whose output direction (row of
    `W_out`) has a negative direct effect on Yes-No, ranked by that effect times their
    activation at the answer position in control runs (the push towards No they give when
    nothing is injected); with each one's activation under injection.

    The direct effect is `W_out[n] . (mean W_U[:, Yes] - mean W_U[:, No])`, which ignores the
    final norm's scale. (The paper ranks transcoder latents the same way; `gate_latents` does
    it for SAE latents.)
    """
    writers = {f"blocks.{layer}.mlp.hook_post": model.blocks[layer].mlp.W_out for layer in layers}
    rows = _gate_candidates(model, prompt, marker, injections, writers, top)
    return [{"layer": int(r["site"].split(".")[1]), "neuron": r.pop("index"),
             **{k: v for k, v in r.items() if k != "site"}} for r in rows]


def gate_latents(model: HookedTransformer, prompt: str, marker: Marker,
                 injections: Sequence[Injection], saes: dict[str, Any], top: int = 10
                 ) -> list[dict[str, Any]]:
    """`gate_neurons` for SAE latents: `saes` maps each attached SAE's hook name to the SAE, and
    a latent's output direction is its decoder row `W_dec[j]` (in the hook point's units). For
    SAEs on `hook_mlp_out` or on the residual stream that row is what the latent writes to the
    residual stream. Rows carry `site` (the latent hook name) and `latent`."""
    from interp.saes import latent_hook_name

    writers = {latent_hook_name(h): sae.W_dec for h, sae in saes.items()}
    rows = _gate_candidates(model, prompt, marker, injections, writers, top)
    return [{"site": r.pop("site"), "latent": r.pop("index"), **r} for r in rows]


def _monotone_units(model: HookedTransformer, prompt: str, marker: Marker,
                    vectors: Float[Tensor, "n d_model"], layer: int, strengths: Sequence[float],
                    name: str, stop_at_layer: int, top: int) -> dict[str, Any]:
    """Units of activation `name` whose mean at the answer position, over the concepts
    `vectors` injected at `layer`, grows strictly with the strength (0 included)."""
    levels = [0.0, *sorted(strengths)]
    means = []
    with torch.no_grad():
        for s in levels:
            injections = [Injection(v, layer, s) for v in vectors]
            tokens, hooks = _same_prompt_batch(model, prompt, marker, injections)
            with model.hooks(fwd_hooks=[fh for h in hooks for fh in h.fwd_hooks()]):
                _, cache = model.run_with_cache(tokens, names_filter=name,
                                                stop_at_layer=stop_at_layer)
            means.append(cache[name][:, -1].float().mean(0).cpu())
    table = torch.stack(means)  # [level, units]
    monotone = (table.diff(dim=0) > 0).all(dim=0)
    rise = table[-1] - table[0]
    picked = [int(k) for k in torch.argsort(rise, descending=True).tolist() if monotone[k]][:top]
    return {"site": name, "strengths": levels, "n_monotone": int(monotone.sum()),
            "n_units": int(table.shape[1]),
            "top": [{"index": k, "rise": float(rise[k]), "means": table[:, k].tolist()}
                    for k in picked]}


def evidence_neurons(model: HookedTransformer, prompt: str, marker: Marker,
                     vectors: Float[Tensor, "n d_model"], layer: int, strengths: Sequence[float],
                     top: int = 10) -> dict[str, Any]:
    """"Evidence carriers": MLP neurons of the block after the injection layer whose mean
    activation at the answer position grows strictly with the strength (0 included), over
    the concepts `vectors`.

    Returns the number of such neurons among `d_mlp`, and the `top` of them by the rise from
    strength 0 to the largest.
    """
    if layer + 1 >= model.cfg.n_layers:
        return {"layer": None, "n_monotone": 0, "top": []}
    found = _monotone_units(model, prompt, marker, vectors, layer, strengths,
                            f"blocks.{layer + 1}.mlp.hook_post", layer + 2, top)
    return {"layer": layer + 1, "strengths": found["strengths"],
            "n_monotone": found["n_monotone"], "d_mlp": found["n_units"],
            "top": [{"neuron": t["index"], "rise": t["rise"], "means": t["means"]}
                    for t in found["top"]]}


def evidence_latents(model: HookedTransformer, prompt: str, marker: Marker,
                     vectors: Float[Tensor, "n d_model"], layer: int, strengths: Sequence[float],
                     sae_hook: str, top: int = 10) -> dict[str, Any]:
    """`evidence_neurons` for the latents of the SAE attached at `sae_hook` (a hook of a block
    after `layer`, e.g. `blocks.{layer + 1}.hook_mlp_out`): the latents whose mean activation at
    the answer position grows strictly with the injection strength (0 included)."""
    from interp.saes import latent_hook_name

    block = int(sae_hook.split(".")[1])
    if block <= layer:
        raise ValueError(f"evidence_latents: the SAE at {sae_hook} is not after the injection "
                         f"layer {layer}; attach one at a later block")
    found = _monotone_units(model, prompt, marker, vectors, layer, strengths,
                            latent_hook_name(sae_hook), block + 1, top)
    n_latents = found.pop("n_units")
    return {**found, "n_latents": n_latents,
            "top": [{"latent": t["index"], "rise": t["rise"], "means": t["means"]}
                    for t in found["top"]]}
