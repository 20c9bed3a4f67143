"""Parametric concept vectors: vocabulary projections of MLP value vectors, a locator that finds
the value vector carrying a concept, and trace metrics of how an edit or fine-tune moved it.

Background (Geva et al. 2022; Hong et al., "Intrinsic evaluation of unlearning using
parametric knowledge traces", arXiv 2406.11614, "ConceptVectors"). A layer's MLP writes
`sum_d h_d W_out[d, :]` into the residual stream (TransformerLens `blocks.{L}.mlp.W_out` is
`[d_mlp, d_model]`; row `d` is a column of Hugging Face's `down_proj.weight`). Row `d` is the
*value vector* of neuron `d`. Read through the unembedding, `W_out[L, d] @ W_U` scores every
vocabulary token; its top tokens often name one topic, and ConceptVectors calls a value vector
whose top tokens belong to one concept, and whose perturbation damages the model's knowledge
of that concept only, a *concept vector*.

**Vocabulary projection** (`project`, `top_tokens`, `projection_top_tokens`). The paper
multiplies the raw vector by the output embedding, with no final norm
(`final_norm=False`, the default here). `final_norm=True` first applies the model's final
norm (`ln_final`) to the vector as if it were a residual stream; for RMSNorm this multiplies
coordinate-wise by the norm's weight (the 1/rms scale does not change a ranking), for
LayerNorm it also centres and adds the bias. Use raw weights (`models.load(...,
processing=False)`): TransformerLens's weight processing folds the norm weight into `W_U`
and centres it, which changes the projection of every vector. The unembedding bias (zero
for Llama-like models) is left out, as in the paper.

**Concept relatedness** (`ConceptReference`, `relatedness`). The share of a vector's top-k
projected tokens that occur in a reference text (the concept's Wikipedia article), stop words
removed: the quantity behind the paper's `preciser_jaccard` (`Jailbreak/evaluate_util.py::
jaccard_similarity`, which keeps the top-200 projected tokens that appear in the article's
tokenisation, minus NLTK's English stop words). Token *ids* are compared (the paper compares
token strings, which is the same thing: a vocabulary maps ids to distinct strings). A
reference is a boolean mask over the vocabulary, built from a text through the model's
tokenizer or from token ids plus an optional id -> text function (tiny test models have no
tokenizer). Stop words are scikit-learn's `ENGLISH_STOP_WORDS` (NLTK's corpus needs a
download); they are matched on the token's text stripped of white space and word-boundary
markers and lowercased. The paper matched the raw SentencePiece string (`"▁the"`), which
never equals a stop word, so its filter only removed word-internal pieces; ours removes
what was meant.

**The locator** ranks every value vector of every layer for a concept:

- (a) `projection_scores`: relatedness to the concept's reference, against a *background*:
  the mean relatedness of the same vector to other concepts' references (so tokens that occur
  in any article, punctuation and common words, do not count), floored at the chance rate
  `|reference| / d_vocab`. `excess = relatedness - background`, and a one-sided binomial
  p-value of the hit count `k * relatedness` under the background rate; a vector is
  *significant* when that p-value, Bonferroni-corrected over all vectors scored, is below
  `alpha`. The binomial treats the k tokens as independent draws, which they are not quite;
  read it as a calibrated threshold, not an exact test.
- (b) `activation_scores`: how much more neuron `d` fires on texts with the concept than on
  texts without it: the difference of the mean (over texts) of each text's token-mean
  `mlp.hook_post`, and Welch's t statistic of the two groups of per-text means.
- (c) `causal_validation`: Gaussian noise on a candidate vector at several scales
  (`sigma` relative to the layer's median `W_out` row norm by default, so the noise norm is
  about `sigma` times a typical value vector; the per-coordinate std used is reported), then
  a caller-supplied score of the noised model, typically answer similarity (BLEU against the
  unedited model's answers, `similarity_scorer`) on the concept's questions and on unrelated
  questions. `best_validated` keeps the candidate whose noise hurts the concept's answers
  most beyond the unrelated ones, or None when no candidate's gap reaches `min_gap`.
  The paper's noise is an absolute per-coordinate std of 0.1 on LLaMA-2-7B (d_model 4096); a
  relative sigma makes one number mean the same across models with other weight scales.

**Trace metrics** (`trace_metrics`) compare a vector before and after an edit, as the paper's
evaluation does (`cosine_similarity`, `norm_distance`, `jaccard_similarity` of
`Jailbreak/evaluate_util.py`): cosine similarity, L2 distance, Jaccard similarity of the two
top-200 projected token sets, the related-token retention rate (the share of the *before*
vector's article-related top tokens still among the *after* vector's top tokens, their
`related_tokens_rate`) and the ratio of related-token counts after/before (their
`preciser_sim`). Each vector is projected with its own model's unembedding (full fine-tuning
changes `W_U` too; pass `unembed_after`). `vector_change_share` gives the share of the total
squared parameter change `||delta theta||^2` that lands on one vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp import edits

__all__ = [
    "NOISE_SIGMAS",
    "ActivationScores",
    "ConceptReference",
    "Locator",
    "ProjectionScores",
    "Trace",
    "ValidationRow",
    "activation_scores",
    "best_validated",
    "causal_validation",
    "locate",
    "parameter_snapshot",
    "project",
    "projection_scores",
    "projection_top_tokens",
    "relatedness",
    "similarity_scorer",
    "stop_words",
    "token_text_function",
    "top_tokens",
    "trace_metrics",
    "vector_change_share",
]

#: Noise scales of the causal validation (relative to the layer's median value-vector norm).
NOISE_SIGMAS = (0.1, 0.3, 0.5, 1.0)

_BOUNDARY_MARKERS = "\u0120\u2581\u010a"  # GPT-2 'Ġ' (space), SentencePiece '▁', GPT-2 'Ċ' (newline)


# --------------------------------------------------------------------------------------------
# Vocabulary projection
# --------------------------------------------------------------------------------------------


def project(
    model: HookedTransformer,
    vectors: Float[Tensor, "... d_model"],
    final_norm: bool = False,
) -> Float[Tensor, "... d_vocab"]:
    """Vocabulary scores `vectors @ W_U` (float32), optionally after the final norm.

    Args:
        model: its `W_U` (and `ln_final` with `final_norm`) are used; load it raw.
        vectors: residual-stream vectors, e.g. value vectors `W_out[L, d]`.
        final_norm: apply `model.ln_final` to each vector first (see the module docstring).
    """
    if vectors.shape[-1] != model.cfg.d_model:
        raise ValueError(f"vectors have last dimension {vectors.shape[-1]} but the model's "
                         f"d_model is {model.cfg.d_model}")
    w_u = model.W_U.detach().float()
    x = vectors.detach().to(w_u.device).float()
    if final_norm:
        shape = x.shape
        with torch.no_grad():
            x = model.ln_final(x.reshape(1, -1, shape[-1]).to(model.W_U.dtype)).float().reshape(shape)
    return x @ w_u


def top_tokens(
    model: HookedTransformer,
    vectors: Float[Tensor, "... d_model"],
    k: int = 200,
    final_norm: bool = False,
) -> Int[Tensor, "... k"]:
    """Ids of the `k` highest-scoring tokens of each vector's projection, best first."""
    if not 1 <= k <= model.cfg.d_vocab:
        raise ValueError(f"k must be in 1..d_vocab={model.cfg.d_vocab}, got {k}")
    return project(model, vectors, final_norm).topk(k, dim=-1).indices.cpu()


@torch.no_grad()
def projection_top_tokens(
    model: HookedTransformer,
    k: int = 200,
    final_norm: bool = False,
    layers: Sequence[int] | None = None,
    chunk: int = 512,
    progress: Callable[[int], None] | None = None,
) -> Int[Tensor, "layer d_mlp k"]:
    """Top-`k` projected token ids of every value vector of the given layers (default all).

    The full `[d_mlp, d_vocab]` score matrix of a layer is never held: rows go `chunk` at a
    time. Costs `n_layers * d_mlp * d_model * d_vocab` multiply-adds (SmolLM2: 1.3e12).
    `progress(layer)` is called after each layer. Ids are int32 to keep the result small.
    """
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    out = torch.empty((len(layer_list), model.cfg.d_mlp, k), dtype=torch.int32)
    for i, layer in enumerate(layer_list):
        w = dict(model.named_parameters())[edits.value_vector_name(model, layer)].detach()
        for start in range(0, w.shape[0], chunk):
            out[i, start:start + chunk] = top_tokens(model, w[start:start + chunk], k,
                                                     final_norm).to(torch.int32)
        if progress is not None:
            progress(layer)
    return out


# --------------------------------------------------------------------------------------------
# Concept relatedness
# --------------------------------------------------------------------------------------------


def stop_words() -> frozenset[str]:
    """scikit-learn's English stop words (318 words; available offline)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def token_text_function(model: HookedTransformer) -> Callable[[int], str]:
    """id -> the token's text (`tokenizer.decode([id])`), decoded once for the whole vocabulary
    (one batched call) and kept on the tokenizer; needs a tokenizer."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.cfg.model_name} has no tokenizer; pass token_text= yourself "
                         "(or None to skip stop-word removal)")
    texts = getattr(tok, "_interp_token_texts", None)
    if texts is None or len(texts) != model.cfg.d_vocab:
        known = min(len(tok), model.cfg.d_vocab)  # ids past the tokenizer's (padding rows): ""
        texts = tok.batch_decode([[i] for i in range(known)]) + [""] * (model.cfg.d_vocab - known)
        tok._interp_token_texts = texts
    return texts.__getitem__


def normalise_token_text(text: str) -> str:
    """A token's text as stop words are matched: boundary markers and white space stripped,
    lowercased (`" The"`, `"Ġthe"`, `"▁the"` -> `"the"`)."""
    return text.strip().strip(_BOUNDARY_MARKERS).strip().lower()


@dataclass(frozen=True)
class ConceptReference:
    """The vocabulary tokens that occur in a concept's reference text, stop words removed.

    Attributes:
        mask: `[d_vocab]` bool, True for tokens of the reference.
        name: the concept's name (for reports).
        n_removed: tokens of the text left out as stop words (or empty text).
    """

    mask: Bool[Tensor, " d_vocab"]
    name: str = ""
    n_removed: int = 0

    @property
    def size(self) -> int:
        return int(self.mask.sum())

    @property
    def chance(self) -> float:
        """The share of the vocabulary in the reference: a random token's chance to be in it."""
        return self.size / self.mask.numel()

    @classmethod
    def from_token_ids(
        cls,
        ids: Iterable[int],
        d_vocab: int,
        token_text: Callable[[int], str] | None = None,
        stop: Iterable[str] | None = None,
        name: str = "",
    ) -> ConceptReference:
        """From the token ids of a text. With `token_text` (id -> text), ids whose normalised
        text (`normalise_token_text`) is empty or a stop word (default `stop_words()`) are
        dropped; without it nothing is dropped."""
        unique = sorted({int(i) for i in ids})
        if any(i < 0 or i >= d_vocab for i in unique):
            raise ValueError(f"token ids must be in 0..{d_vocab - 1}")
        removed = 0
        if token_text is not None:
            words = stop_words() if stop is None else frozenset(stop)
            keep = []
            for i in unique:
                text = normalise_token_text(token_text(i))
                if text and text not in words:
                    keep.append(i)
            removed = len(unique) - len(keep)
            unique = keep
        mask = torch.zeros(d_vocab, dtype=torch.bool)
        mask[unique] = True
        return cls(mask, name, removed)

    @classmethod
    def from_text(cls, model: HookedTransformer, text: str, name: str = "",
                  stop: Iterable[str] | None = None) -> ConceptReference:
        """From a text through the model's tokenizer (no special tokens), stop words removed."""
        if model.tokenizer is None:
            raise ValueError(f"{model.cfg.model_name} has no tokenizer, so it cannot read text; "
                             "use ConceptReference.from_token_ids")
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        return cls.from_token_ids(ids, model.cfg.d_vocab, token_text_function(model), stop, name)


def relatedness(top_ids: Int[Tensor, "... k"], reference: ConceptReference) -> Float[Tensor, ...]:
    """Share of each row of top-k token ids that lies in the reference."""
    return reference.mask[top_ids.long()].float().mean(-1)


class ProjectionScores(NamedTuple):
    """Locator criterion (a), per value vector.

    Attributes:
        relatedness: share of the top-k tokens in the concept's reference.
        background: mean relatedness to the other references, floored at the chance rate.
        excess: `relatedness - background` (the ranking score).
        p_value: one-sided binomial p-value of the hits under the background rate.
        significant: Bonferroni-corrected `p_value * n_vectors < alpha`.
        k: tokens per projection.
    """

    relatedness: Float[Tensor, "layer d_mlp"]
    background: Float[Tensor, "layer d_mlp"]
    excess: Float[Tensor, "layer d_mlp"]
    p_value: Float[Tensor, "layer d_mlp"]
    significant: Bool[Tensor, "layer d_mlp"]
    k: int


def projection_scores(
    top_ids: Int[Tensor, "layer d_mlp k"],
    reference: ConceptReference,
    others: Sequence[ConceptReference] = (),
    alpha: float = 0.05,
) -> ProjectionScores:
    """Criterion (a) of the locator (see the module docstring)."""
    from scipy.stats import binom

    k = top_ids.shape[-1]
    rel = relatedness(top_ids, reference)
    floor = torch.full_like(rel, reference.chance)
    if others:
        background = torch.stack([relatedness(top_ids, o) for o in others]).mean(0)
        background = torch.maximum(background, floor)
    else:
        background = floor
    hits = torch.round(rel * k)
    p = torch.as_tensor(binom.sf((hits - 1).numpy(), k, background.clamp(max=1.0).numpy()),
                        dtype=torch.float32)
    significant = p * rel.numel() < alpha
    return ProjectionScores(rel, background, rel - background, p, significant, k)


# --------------------------------------------------------------------------------------------
# Activation differences
# --------------------------------------------------------------------------------------------


class ActivationScores(NamedTuple):
    """Locator criterion (b), per neuron.

    Attributes:
        diff: mean over concept texts minus mean over other texts of each text's token-mean
            `mlp.hook_post`.
        t: Welch's t statistic of the two groups of per-text means (0 where both variances
            vanish).
        n_with, n_without: texts in each group.
    """

    diff: Float[Tensor, "layer d_mlp"]
    t: Float[Tensor, "layer d_mlp"]
    n_with: int
    n_without: int


def activation_scores(
    model: HookedTransformer,
    with_concept: Sequence[str] | Sequence[Sequence[int]],
    without_concept: Sequence[str] | Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    max_tokens: int = 256,
) -> ActivationScores:
    """Criterion (b): neuron activation on texts with the concept against texts without it.

    Texts are strings (the model's tokenizer) or token ids; each is cut to its last
    `max_tokens` tokens (`interp.concepts.collect.tokenize`). Needs at least two texts per
    group for the t statistic.
    """
    from interp.concepts.collect import collect

    if len(with_concept) < 2 or len(without_concept) < 2:
        raise ValueError("activation_scores needs at least 2 texts with and 2 without the concept")
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)

    def per_text(texts):
        acts = collect(model, texts, hooks="mlp_post", layers=layer_list, pool="mean",
                       batch_size=batch_size, max_tokens=max_tokens, progress=False)
        return torch.stack([acts[f"blocks.{L}.mlp.hook_post"] for L in layer_list], dim=1)

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # left-truncation notices
        a, b = per_text(list(with_concept)), per_text(list(without_concept))  # [n, layer, d_mlp]
    diff = a.mean(0) - b.mean(0)
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    t = torch.where(se > 0, diff / se.clamp(min=1e-12), torch.zeros_like(diff))
    return ActivationScores(diff, t, a.shape[0], b.shape[0])


# --------------------------------------------------------------------------------------------
# The locator
# --------------------------------------------------------------------------------------------


@dataclass
class Locator:
    """The ranking of every value vector of the scored layers for one concept.

    Attributes:
        layers: the layers scored (row `i` of every tensor is layer `layers[i]`).
        projection: criterion (a).
        activation: criterion (b), or None when no texts were given.
    """

    layers: list[int]
    projection: ProjectionScores
    activation: ActivationScores | None = None

    def _where(self, flat: int) -> tuple[int, int]:
        d_mlp = self.projection.excess.shape[1]
        return self.layers[flat // d_mlp], flat % d_mlp

    def top_by_projection(self, n: int, significant_only: bool = True) -> list[tuple[int, int]]:
        """The `n` vectors with the highest excess relatedness (significant ones only)."""
        score = self.projection.excess.clone()
        if significant_only:
            score[~self.projection.significant] = -math.inf
        order = score.flatten().argsort(descending=True)[:n]
        return [self._where(int(i)) for i in order if score.flatten()[i] > -math.inf]

    def top_by_activation(self, n: int) -> list[tuple[int, int]]:
        """The `n` neurons with the largest positive t statistic (more active with the concept)."""
        if self.activation is None:
            return []
        t = self.activation.t.flatten()
        order = t.argsort(descending=True)[:n]
        return [self._where(int(i)) for i in order if t[i] > 0]

    def candidates(self, n_projection: int = 3, n_activation: int = 2) -> list[tuple[int, int]]:
        """Candidates for causal validation: the top significant vectors by (a), then the top
        neurons by (b) not already listed."""
        out = self.top_by_projection(n_projection)
        for c in self.top_by_activation(n_activation + len(out)):
            if c not in out and len(out) < n_projection + n_activation:
                out.append(c)
        return out

    def n_significant(self) -> int:
        return int(self.projection.significant.sum())

    def row(self, layer: int, index: int) -> dict[str, float]:
        """Every score of one vector, as a dict (for reports)."""
        i = self.layers.index(layer)
        p = self.projection
        out = {"layer": layer, "index": index, "relatedness": float(p.relatedness[i, index]),
               "background": float(p.background[i, index]), "excess": float(p.excess[i, index]),
               "p_value": float(p.p_value[i, index]),
               "significant": bool(p.significant[i, index])}
        if self.activation is not None:
            out["activation_diff"] = float(self.activation.diff[i, index])
            out["activation_t"] = float(self.activation.t[i, index])
        return out


def locate(
    model: HookedTransformer,
    reference: ConceptReference,
    others: Sequence[ConceptReference] = (),
    with_concept: Sequence[Any] | None = None,
    without_concept: Sequence[Any] | None = None,
    k: int = 200,
    final_norm: bool = False,
    layers: Sequence[int] | None = None,
    top_ids: Int[Tensor, "layer d_mlp k"] | None = None,
    alpha: float = 0.05,
    max_tokens: int = 256,
) -> Locator:
    """Rank every value vector of `layers` (default all) for a concept by (a) and (b).

    Args:
        model: a raw model (`processing=False`).
        reference: the concept's reference tokens.
        others: other concepts' references, the background of (a).
        with_concept, without_concept: texts for (b) (None: skip it).
        k: top tokens per projection.
        final_norm: project after the final norm.
        layers: the layers to score.
        top_ids: precomputed `projection_top_tokens(model, k, final_norm, layers)` (the
            expensive part, shared by every concept).
        alpha: significance level of (a), Bonferroni-corrected.
        max_tokens: tokens per text for (b).
    """
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    if top_ids is None:
        top_ids = projection_top_tokens(model, k, final_norm, layer_list)
    if top_ids.shape[:2] != (len(layer_list), model.cfg.d_mlp):
        raise ValueError(f"top_ids has shape {tuple(top_ids.shape)}, expected "
                         f"({len(layer_list)}, {model.cfg.d_mlp}, k) for layers {layer_list}")
    scores = projection_scores(top_ids, reference, others, alpha)
    act = None
    if with_concept is not None and without_concept is not None:
        act = activation_scores(model, with_concept, without_concept, layer_list,
                                max_tokens=max_tokens)
    return Locator(layer_list, scores, act)


# --------------------------------------------------------------------------------------------
# Causal validation
# --------------------------------------------------------------------------------------------


class ValidationRow(NamedTuple):
    """One candidate under one noise scale.

    Attributes:
        layer, index: the value vector.
        sigma: the relative noise scale.
        std: the absolute per-coordinate standard deviation used.
        noise_norm: the norm of the noise drawn.
        vector_norm: the vector's norm.
        target: the score on the concept's items (e.g. BLEU against the unedited answers).
        unrelated: the score on unrelated items.
        gap: `unrelated - target` (large: the noise hurts the concept only).
    """

    layer: int
    index: int
    sigma: float
    std: float
    noise_norm: float
    vector_norm: float
    target: float
    unrelated: float
    gap: float


def causal_validation(
    model: HookedTransformer,
    candidates: Sequence[tuple[int, int]],
    score: Callable[[HookedTransformer], tuple[float, float]],
    sigmas: Sequence[float] = NOISE_SIGMAS,
    relative_to: Literal["vector", "layer"] | None = "layer",
    seed: int = 0,
) -> list[ValidationRow]:
    """Criterion (c): noise on each candidate at each scale, then `score(model)`.

    `score` returns `(target, unrelated)` similarities of the edited model. The model is
    restored after every edit (bit for bit; `interp.edits`).
    """
    rows = []
    for layer, index in candidates:
        for sigma in sigmas:
            with edits.add_noise(model, layer, index, sigma, relative_to=relative_to,
                                 seed=seed) as edit:
                target, unrelated = score(model)
            r = edit.record
            rows.append(ValidationRow(layer, index, float(sigma), r["std"], r["noise_norm"],
                                      r["vector_norm"], float(target), float(unrelated),
                                      float(unrelated) - float(target)))
    return rows


def best_validated(rows: Sequence[ValidationRow], min_gap: float = 0.1
                   ) -> tuple[int, int] | None:
    """The candidate with the largest mean gap over its noise scales, if its largest gap
    reaches `min_gap`; None when none does (report that honestly: no concept vector found)."""
    by: dict[tuple[int, int], list[ValidationRow]] = {}
    for r in rows:
        by.setdefault((r.layer, r.index), []).append(r)
    ok = {c: sum(r.gap for r in rs) / len(rs) for c, rs in by.items()
          if max(r.gap for r in rs) >= min_gap}
    return max(ok, key=ok.get) if ok else None


def similarity_scorer(
    model: HookedTransformer,
    target_prompts: Sequence[str],
    unrelated_prompts: Sequence[str],
    max_new_tokens: int = 100,
    chat: bool = False,
    metric: Literal["bleu", "rouge_l"] = "bleu",
    batch_size: int | None = None,
    references: Sequence[str] | None = None,
) -> Callable[[HookedTransformer], tuple[float, float]]:
    """A `score` for `causal_validation`: mean BLEU (or ROUGE-L) of greedy answers against the
    answers the model gives *now* (computed once, at the call; or `references`, the unedited
    answers to target then unrelated prompts, when already at hand), on target and unrelated
    prompts (`interp.generation.generate_with`, `interp.judges.judge_similarity`)."""
    from interp.generation import generate_with
    from interp.judges import judge_similarity

    prompts = list(target_prompts) + list(unrelated_prompts)
    n = len(target_prompts)

    def answers(m: HookedTransformer) -> list[str]:
        return generate_with(m, prompts, max_new_tokens=max_new_tokens, chat=chat,
                             batch_size=batch_size, progress=False).texts

    if references is None:
        with torch.no_grad():
            references = answers(model)
    elif len(references) != len(prompts):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
    references = list(references)

    def score(m: HookedTransformer) -> tuple[float, float]:
        with torch.no_grad():
            got = answers(m)
        t = judge_similarity(got[:n], references[:n]).means[metric].mean
        u = judge_similarity(got[n:], references[n:]).means[metric].mean
        return float(t), float(u)

    score.references = references  # type: ignore[attr-defined]
    return score


# --------------------------------------------------------------------------------------------
# Trace metrics
# --------------------------------------------------------------------------------------------


class Trace(NamedTuple):
    """How a vector moved (ConceptVectors' definitions, `Jailbreak/evaluate_util.py`).

    Attributes:
        cosine: cosine similarity of before and after.
        l2: `||after - before||`.
        jaccard: `|T_b & T_a| / |T_b | T_a|` of the top-k projected token sets.
        related_retention: `|T_a & R_b| / |R_b|`, `R_b = T_b & reference` (their
            `related_tokens_rate`); NaN without a reference or with `R_b` empty.
        related_ratio: `|T_a & reference| / |R_b|` (their `preciser_sim`); NaN likewise.
        n_related_before, n_related_after: `|R_b|`, `|T_a & reference|` (-1 without one).
    """

    cosine: float
    l2: float
    jaccard: float
    related_retention: float
    related_ratio: float
    n_related_before: int
    n_related_after: int


def trace_metrics(
    before: Float[Tensor, " d_model"],
    after: Float[Tensor, " d_model"],
    model: HookedTransformer,
    reference: ConceptReference | None = None,
    k: int = 200,
    final_norm: bool = False,
    unembed_after: HookedTransformer | None = None,
) -> Trace:
    """Trace metrics of a vector before and after an edit (see `Trace`).

    `model` projects `before`; `unembed_after` (default `model`) projects `after`.
    """
    b, a = before.detach().double().cpu(), after.detach().double().cpu()  # float64: cos(v, v) = 1
    cosine = float(torch.nn.functional.cosine_similarity(b, a, dim=-1).clamp(max=1.0))
    l2 = float((a - b).norm())
    tb = set(top_tokens(model, b, k, final_norm).tolist())
    ta = set(top_tokens(unembed_after or model, a, k, final_norm).tolist())
    jaccard = len(tb & ta) / len(tb | ta)
    if reference is None:
        return Trace(cosine, l2, jaccard, math.nan, math.nan, -1, -1)
    ref = set(torch.nonzero(reference.mask).flatten().tolist())
    rb = tb & ref
    n_after = len(ta & ref)
    retention = len(ta & rb) / len(rb) if rb else math.nan
    ratio = n_after / len(rb) if rb else math.nan
    return Trace(cosine, l2, jaccard, retention, ratio, len(rb), n_after)


def parameter_snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter (on the CPU), for `vector_change_share`."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def vector_change_share(
    before: Mapping[str, Tensor],
    model: torch.nn.Module,
    layer: int,
    index: int,
) -> dict[str, float]:
    """How much of the parameter change since `before` lands on value vector `(layer, index)`.

    Returns:
        `total_sq` (`||delta theta||^2`), `vector_sq` (`||delta v||^2`), `share`
        (`vector_sq / total_sq`, NaN when nothing changed) and `total_norm`, `vector_norm`.
    """
    name = edits.value_vector_name(model, layer)
    total = 0.0
    vec = 0.0
    for n, p in model.named_parameters():
        if n not in before:
            raise ValueError(f"the snapshot has no parameter {n}; take it with parameter_snapshot")
        d = p.detach().cpu().float() - before[n].float()
        total += float((d * d).sum())
        if n == name:
            vec = float((d[index] * d[index]).sum())
    share = vec / total if total > 0 else math.nan
    return {"total_sq": total, "vector_sq": vec, "share": share,
            "total_norm": math.sqrt(total), "vector_norm": math.sqrt(vec)}
