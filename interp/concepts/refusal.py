"""The refusal direction (Arditi et al. 2024, "Refusal in language models is mediated by a single
direction", arXiv 2406.11717).

Chat models refuse harmful requests; Arditi et al. found that, in many of them, a single
residual-stream direction mediates this: removing it (directional ablation at every layer) makes
the model comply with harmful requests, and adding it makes the model refuse harmless ones. The
recipe, which this module follows:

1. **Prompts.** Instructions go through the chat template as one user turn, with the
   generation prompt. The tokens after the instruction (for SmolLM2
   `<|im_end|>\\n<|im_start|>assistant\\n`, six tokens, "assistant" being two; `post_instruction_tokens`) are the same
   for every prompt; the model decides there whether to refuse.
2. **Candidates.** At every layer (`resid_pre`) and every post-instruction position, the
   difference of means of harmful minus harmless training prompts (`candidate_directions`).
3. **Selection** on validation prompts (`select_direction`), for each candidate `r`:
   *bypass*: the mean refusal score of harmful prompts with `r` ablated everywhere (lower is
   better); *induce*: the mean refusal score of harmless prompts with `r` added at its layer
   (must exceed `induce_threshold`, default 0); *KL*: the KL divergence of the next-token
   distribution of harmless prompts under ablation from the clean one (must stay below
   `kl_threshold`, default 0.1). Layers in the last `prune_last` fraction (default 20%) are
   left out, since a direction there acts on the output directly rather than on the decision.
   The candidate with the lowest bypass score among those that pass is chosen.
4. **Refusal score.** The log-odds of the refusal tokens at the first generated position:
   `log(p / (1 - p))` with `p` the total probability of a small set of tokens that start
   refusals (`DEFAULT_REFUSAL_STARTS`: "I", "Sorry", "As", "Unfortunately" for SmolLM2). This
   is a cheap proxy: "I" also starts many compliant answers ("I'd be happy to..."), so the
   score's absolute level means little; its *change* under an intervention is what counts.
   `refusal_rate` is the slower, more direct check: greedy completions judged by substring
   matching of refusal phrases (`REFUSAL_PHRASES`, those of Arditi et al.), which misses
   refusals phrased otherwise and counts "I cannot stress enough..." as one.

Prompts are pre-tokenised (lists of token ids) and refusal tokens are explicit ids, so the
machinery runs on models without a tokenizer too (the tests plant a refusal direction in a tiny
random model). `format_prompts` turns instructions into token ids with the chat template;
`load_instructions` reads the splits of Arditi et al. from `../shared/data/refusal/splits/`.
The study `refusal-direction` (`experiments/refusal_direction.py`) runs the whole procedure and
the generation-based checks on a chat model.

The tests check the machinery on a planted direction in a tiny random model.
"""

from __future__ import annotations

import copy
import json
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from interp import hooks as _hooks
from interp.data import data_file
from interp.generation import (
    Generation,
    generate_with,
    last_position_logits,
    left_pad,
    next_token_logits,
    pad_id,
)
from interp.judges.refusal import REFUSAL_PHRASES, is_refusal  # re-exported from their owner
from interp.layout import inference_layout
from interp.tokens import tokenize

__all__ = [
    "DEFAULT_REFUSAL_STARTS",
    "REFUSAL_PHRASES",
    "DirectionScores",
    "RefusalDirection",
    "RefusalRate",
    "candidate_directions",
    "find_refusal_direction",
    "format_prompts",
    "is_refusal",
    "load_instructions",
    "post_instruction_tokens",
    "refusal_rate",
    "refusal_log_odds",
    "refusal_scores",
    "refusal_token_ids",
    "SharedPrefix",
    "common_prefix_length",
    "select_direction",
]

#: First tokens of typical refusals ("I cannot...", "Sorry, ...", "As an AI...",
#: "Unfortunately, ..."), each a single token (no leading space: the assistant turn starts after
#: a newline). Checked by `refusal_token_ids`.
DEFAULT_REFUSAL_STARTS: tuple[str, ...] = ("I", "Sorry", "As", "Unfortunately")

Prompts = Sequence[Sequence[int]]


# --------------------------------------------------------------------------------------------
# Data and prompt formatting
# --------------------------------------------------------------------------------------------


def load_instructions(
    kind: Literal["harmful", "harmless"],
    split: Literal["train", "val", "test"],
    n: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Instructions from `refusal/splits/{kind}_{split}.json` under the data directory.

    The splits are those of Arditi et al. (harmful: AdvBench, MaliciousInstruct, TDC2023,
    HarmBench, JailbreakBench...; harmless: Alpaca), 260/39/572 harmful and
    18,793/6,264/6,266 harmless instructions for train/val/test.

    Args:
        kind: "harmful" or "harmless".
        split: "train", "val" or "test".
        n: a random subsample of this size (all when None or larger than the split).
        seed: seed of the subsample (`random.Random(seed).sample`), in sampled order.
    """
    if kind not in ("harmful", "harmless"):
        raise ValueError(f"kind must be 'harmful' or 'harmless', got {kind!r}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    rows = json.loads(data_file(f"refusal/splits/{kind}_{split}.json").read_text())
    instructions = [r["instruction"] for r in rows]
    if n is None or n >= len(instructions):
        return instructions
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return random.Random(seed).sample(instructions, n)


def format_prompts(
    model: HookedTransformer, instructions: Sequence[str], system_prompt: str | None = None
) -> list[list[int]]:
    """Token ids of each instruction as one chat user turn plus the generation prompt.

    Uses `interp.concepts.collect.tokenize(chat_template=True)`, so the tokens are exactly
    those `collect` runs. SmolLM2's template adds its default system message ("You are a
    helpful AI assistant named SmolLM...") when `system_prompt` is None.
    """
    return tokenize(model, list(instructions), chat_template=True, system_prompt=system_prompt)[0]


def post_instruction_tokens(
    model: HookedTransformer, system_prompt: str | None = None
) -> list[int]:
    """The tokens the chat template puts after the instruction (end of the user turn and the
    assistant header), e.g. `<|im_end|>`, `\\n`, `<|im_start|>`, `assistant`, `\\n` for SmolLM2.

    Found by formatting two different instructions and taking their common suffix, checked to
    contain no part of either instruction.

    Raises:
        ValueError: the model has no chat template, or the suffix differs between instructions.
    """
    probes = ["Tell me about the weather today.", "Why is the sky blue?"]
    a, b = format_prompts(model, probes, system_prompt)
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    suffix = a[len(a) - k:]
    decoded = model.tokenizer.decode(suffix)
    if k == 0 or "." in decoded or "?" in decoded:
        raise ValueError(
            f"could not separate the post-instruction tokens of {model.cfg.model_name}'s chat "
            f"template (common suffix {decoded!r}); pass n_post explicitly"
        )
    return suffix


def refusal_token_ids(
    model: HookedTransformer, starts: Sequence[str] = DEFAULT_REFUSAL_STARTS
) -> list[int]:
    """Token ids of refusal starts, each required to be a single token (no BOS, no space added).

    Raises:
        ValueError: a start that is not a single token, naming the tokens it splits into.
    """
    from interp.tokens import single_token

    return [single_token(model, s, "refusal start") for s in starts]


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _as_hook_list(hooks: Sequence[_hooks.Hook] | _hooks.Hook | None) -> list[_hooks.Hook]:
    if hooks is None:
        return []
    return [hooks] if isinstance(hooks, _hooks.Hook) else list(hooks)


def refusal_log_odds(
    logits: Float[Tensor, "n d_vocab"], refusal_tokens: Sequence[int]
) -> Float[Tensor, " n"]:
    """`log p - log(1 - p)`, p = total probability of `refusal_tokens`, computed stably."""
    ids = torch.as_tensor(list(refusal_tokens), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("no refusal tokens given")
    if int(ids.min()) < 0 or int(ids.max()) >= logits.shape[-1]:
        raise ValueError(
            f"refusal token ids must be in [0, {logits.shape[-1]}), got {ids.tolist()}"
        )
    logits = logits.double()
    refuse = torch.zeros(logits.shape[-1], dtype=torch.bool)
    refuse[ids] = True
    yes = logits[:, refuse].logsumexp(-1)
    no = logits[:, ~refuse].logsumexp(-1)
    return (yes - no).float()


def refusal_scores(
    model: HookedTransformer,
    prompts: Prompts,
    refusal_tokens: Sequence[int],
    hooks: Sequence[_hooks.Hook] | _hooks.Hook | None = (),
    batch_size: int = 16,
) -> Float[Tensor, " n"]:
    """Refusal score of each prompt: log-odds of the refusal tokens at the next position.

    `score = log(p / (1 - p))`, `p = sum_{t in refusal_tokens} softmax(logits)[t]` (Arditi et
    al.). Positive means the model more likely than not starts with a refusal token.
    """
    return refusal_log_odds(next_token_logits(model, prompts, hooks, batch_size), refusal_tokens)


def _kl(base: Float[Tensor, "n v"], other: Float[Tensor, "n v"]) -> Float[Tensor, " n"]:
    """KL(base || other) per row, in nats."""
    p = base.double().log_softmax(-1)
    q = other.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).float()


def common_prefix_length(prompts: Prompts) -> int:
    """Number of leading tokens that every prompt shares."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts)
    k = 0
    while k < n and all(p[k] == first[k] for p in prompts):
        k += 1
    return k


class SharedPrefix:
    """Prompts split into their common prefix and right-padded batches of suffixes.

    Chat prompts share a long head (SmolLM2's system message and the user header are 24 of
    about 44 tokens), and under a hook that acts the same way at every position (directional
    ablation, activation addition at all positions) that head's activations are the same in
    every prompt. So the head runs once, as one row, into a KV cache that every batch of
    suffixes reuses (frozen, expanded to the batch). Suffixes are grouped by length into
    batches that waste little padding (`length_batches`) and right-padded: in a causal
    model a real token never attends to a later pad, so no attention mask is needed and each
    prompt is read at its own last token. Only those positions go through the final norm and
    the unembedding. `logits` equals `interp.generation.next_token_logits` up to float
    rounding (tested); it does NOT hold for hooks that depend on the position (e.g. a steer
    from a given position on), for which use `next_token_logits`.

    A hook that acts only from layer `L` on leaves the suffixes' residual stream before `L`
    as it is without hooks, so `logits(hooks, start_layer=L)` starts the suffixes at block
    `L` from the clean `resid_pre` (`residuals`, computed once) and runs only the prefix from
    the embedding.

    Args:
        model: the model.
        prompts: token-id lists.
        batch_size: suffixes per forward pass.
    """

    def __init__(self, model: HookedTransformer, prompts: Prompts, batch_size: int = 32):
        prompts = [list(p) for p in prompts]
        if not prompts:
            raise ValueError("SharedPrefix needs at least one prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        # keep at least one token in every suffix, so that each prompt has a position to read
        self.k = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
        self.prefix = prompts[0][:self.k]
        device = model.cfg.device
        suffixes = [p[self.k:] for p in prompts]
        groups = length_batches([len(r) for r in suffixes], batch_size)
        # logits come out in batch order; `_order[j]` is the prompt of output row j
        self._order = torch.tensor([i for g in groups for i in g], dtype=torch.long)
        self.batches: list[tuple[Tensor, Tensor]] = []  # (suffix tokens, last index) per batch
        for group in groups:
            rows = [suffixes[i] for i in group]
            tokens = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.long)
            for j, r in enumerate(rows):
                tokens[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            self.batches.append((tokens.to(device), torch.tensor([len(r) - 1 for r in rows],
                                                                 device=device)))
        self._clean: list[Float[Tensor, "layer batch pos d_model"]] | None = None

    def _head(self) -> TransformerLensKeyValueCache | None:
        """The prefix's KV cache under the hooks attached now (one row)."""
        if self.k == 0:
            return None
        device = self.model.cfg.device
        head = TransformerLensKeyValueCache.init_cache(self.model.cfg, device, 1)
        self.model(torch.tensor([self.prefix], device=device), past_kv_cache=head,
                   attention_mask=torch.ones((1, self.k), dtype=torch.long, device=device),
                   stop_at_layer=self.model.cfg.n_layers)
        return head

    @torch.no_grad()
    def residuals(self) -> list[Float[Tensor, "layer batch pos d_model"]]:
        """The suffixes' `resid_pre` at every layer without hooks, per batch (computed once)."""
        if self._clean is None:
            names = [f"blocks.{layer}.hook_resid_pre" for layer in range(self.model.cfg.n_layers)]
            self._clean = []
            with _hooks.capture(self.model, names, append=True) as got:
                self.logits()
                for b in range(len(self.batches)):
                    # the capture holds the prefix pass, then the suffix pass of every batch
                    self._clean.append(torch.stack([got[n][b + (self.k > 0)] for n in names]))
        return self._clean

    @torch.no_grad()
    def logits(
        self, hooks: Sequence[_hooks.Hook] | _hooks.Hook | None = (), start_layer: int = 0
    ) -> Float[Tensor, "n d_vocab"]:
        """Next-token logits after each prompt with `hooks` attached (float32, CPU).

        Args:
            hooks: position-independent hooks from `interp.hooks`.
            start_layer: the first layer any hook changes; the suffixes start there from their
                clean residual stream (0: from the tokens).
        """
        model, n_layers = self.model, self.model.cfg.n_layers
        clean = self.residuals() if start_layer > 0 else None
        outs = []
        attached: list[_hooks.Hook] = []
        try:
            for h in _as_hook_list(hooks):
                attached.append(h.attach(model))
            head = self._head()
            for b, (tokens, last) in enumerate(self.batches):
                cache = _expand_cache(head, len(tokens)) if head is not None else None
                mask = torch.ones((len(tokens), self.k + tokens.shape[1]), dtype=torch.long,
                                  device=tokens.device)
                if clean is None:
                    resid = model(tokens, past_kv_cache=cache, stop_at_layer=n_layers,
                                  attention_mask=mask[:, self.k:])
                else:
                    resid = model(clean[b][start_layer], start_at_layer=start_layer,
                                  past_kv_cache=cache, stop_at_layer=n_layers,
                                  attention_mask=mask)
                resid = resid[torch.arange(len(tokens), device=tokens.device), last][:, None]
                outs.append(last_position_logits(model, resid).float().cpu())
        finally:
            for h in reversed(attached):
                h.detach()
        out = torch.cat(outs)
        return out[torch.argsort(self._order)]  # back to the prompts' order


def length_batches(lengths: Sequence[int], max_rows: int, overhead: int = 16) -> list[list[int]]:
    """Indices of `lengths` grouped into batches that waste little padding.

    Right-padding a batch to its longest row costs `rows * max_length` token positions; one
    long prompt in a batch of short ones nearly doubles the work (SmolLM2's validation
    suffixes: 645 real tokens, 1248 padded in one batch). The rows are sorted by length and
    cut into consecutive runs of at most `max_rows` by dynamic programming, minimising the
    padded positions plus `overhead` positions per forward pass (the per-call cost of running
    the model's modules, in token equivalents).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cost of batching the j shortest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + (j - i) * longest + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _expand_cache(head: TransformerLensKeyValueCache, n: int) -> TransformerLensKeyValueCache:
    """A frozen copy of a one-row KV cache, broadcast to `n` rows (no copy until appended)."""
    entries = []
    for e in head.entries:
        entry = copy.copy(e)
        entry.past_keys = e.past_keys.expand(n, *e.past_keys.shape[1:])
        entry.past_values = e.past_values.expand(n, *e.past_values.shape[1:])
        entries.append(entry)
    cache = TransformerLensKeyValueCache(entries, head.previous_attention_mask.expand(n, -1))
    cache.freeze()
    return cache


# --------------------------------------------------------------------------------------------
# Candidates and selection
# --------------------------------------------------------------------------------------------


def candidate_directions(
    model: HookedTransformer,
    harmful: Prompts,
    harmless: Prompts,
    n_post: int,
    hook: str = "resid_pre",
    batch_size: int = 32,
) -> Float[Tensor, "n_post n_layers d_model"]:
    """Difference of means (harmful minus harmless) at every layer and post-instruction position.

    Row `i` is position `i - n_post` counted from the end of the prompt (`-n_post ... -1`),
    read at `hook` (Arditi et al. use `resid_pre`). Each set is run once, in left-padded
    batches with an attention mask (as `interp.concepts.collect` runs texts), and the last
    `n_post` positions of every layer are summed on the fly, so nothing of size
    `[n, pos, d]` is kept. Candidates at positions whose tokens and context are identical in
    both sets (e.g. every position at layer 0, where the template token alone decides the
    residual) are zero up to float rounding.

    Args:
        model: the model.
        harmful, harmless: token-id lists (`format_prompts`), ending with the same
            `n_post` post-instruction tokens.
        n_post: number of post-instruction positions (`len(post_instruction_tokens(model))`).
        hook: the residual-stream family to read.
        batch_size: texts per forward pass.
    """
    if n_post < 1:
        raise ValueError(f"n_post must be >= 1, got {n_post}")
    if not harmful or not harmless:
        raise ValueError("candidate_directions needs harmful and harmless prompts")
    shortest = min(len(p) for p in [*harmful, *harmless])
    if shortest < n_post:
        raise ValueError(f"a prompt has {shortest} tokens, fewer than n_post={n_post}")
    names = _hooks.hook_names(model, hook, "all")
    return (_mean_last_positions(model, harmful, n_post, names, batch_size)
            - _mean_last_positions(model, harmless, n_post, names, batch_size))


@torch.no_grad()
def _mean_last_positions(
    model: HookedTransformer, prompts: Prompts, n_post: int, names: list[str], batch_size: int
) -> Float[Tensor, "n_post n_layers d_model"]:
    """Mean over prompts of the activations at the last `n_post` positions, per hook point."""
    total = torch.zeros(len(names), n_post, model.cfg.d_model, dtype=torch.float64)
    index = {name: i for i, name in enumerate(names)}

    def keep(act: Tensor, hook: Any) -> None:
        total[index[hook.name]] += act[:, -n_post:].detach().double().sum(0).cpu()

    pad = pad_id(model)
    for start in range(0, len(prompts), batch_size):
        tokens, mask = left_pad(prompts[start:start + batch_size], pad, model.cfg.device)
        model.run_with_hooks(tokens, attention_mask=mask, return_type=None,
                             stop_at_layer=model.cfg.n_layers,
                             fwd_hooks=[(name, keep) for name in names])
    return einops.rearrange(total / len(prompts), "layer pos d -> pos layer d").float()


@dataclass
class DirectionScores:
    """Scores of every candidate direction (see `select_direction`); `[n_post, n_layers]` each,
    NaN where a candidate was not evaluated (zero vector, pruned layer, not asked for).

    Attributes:
        bypass: mean refusal score on harmful prompts with the direction ablated everywhere.
        induce: mean refusal score on harmless prompts with the direction added at its layer.
        kl: mean KL(clean || ablated) of the next-token distribution on harmless prompts.
        eligible: passes every filter (layer not pruned, KL and induce thresholds).
        baseline_harmful: mean refusal score on harmful prompts, no intervention.
        baseline_harmless: mean refusal score on harmless prompts, no intervention.
    """

    bypass: Float[Tensor, "n_post n_layers"]
    induce: Float[Tensor, "n_post n_layers"]
    kl: Float[Tensor, "n_post n_layers"]
    eligible: Bool[Tensor, "n_post n_layers"]
    baseline_harmful: float
    baseline_harmless: float


@dataclass
class RefusalDirection:
    """The selected refusal direction.

    Attributes:
        direction: `[d_model]`, the unnormalised difference of means (its norm is the natural
            scale for adding it: scale 1 moves harmless activations to the harmful mean).
        layer: the layer whose `resid_pre` it was read at.
        position: its post-instruction position, negative (counted from the prompt's end).
        passed_filters: False when no candidate passed the KL/induce filters and the best
            bypass score among unpruned candidates was taken instead (a warning is issued).
        candidates: all candidates `[n_post, n_layers, d_model]`.
        scores: the selection scores.
    """

    direction: Float[Tensor, " d_model"]
    layer: int
    position: int
    passed_filters: bool
    candidates: Float[Tensor, "n_post n_layers d_model"]
    scores: DirectionScores

    def ablation(self, model: HookedTransformer) -> _hooks.AblateDirection:
        """Directional ablation at every layer (`resid_pre`, `attn_out`, `mlp_out`)."""
        return _hooks.ablate_direction(model, self.direction)

    def addition(self, model: HookedTransformer, scale: float = 1.0) -> _hooks.Steer:
        """Activation addition of `scale * direction` at its layer, every position."""
        return _hooks.steer(model, self.direction, layers=[self.layer], scale=scale)


def select_direction(
    model: HookedTransformer,
    candidates: Float[Tensor, "n_post n_layers d_model"],
    harmful_val: Prompts,
    harmless_val: Prompts,
    refusal_tokens: Sequence[int],
    kl_threshold: float | None = 0.1,
    induce_threshold: float | None = 0.0,
    prune_last: float = 0.2,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    all_scores: bool = False,
) -> RefusalDirection:
    """Choose the candidate whose ablation lowers refusal most, within the filters.

    For each candidate `r` (position `i`, layer `l`): *bypass* = mean refusal score of
    `harmful_val` with `r` ablated at `resid_pre`, `attn_out` and `mlp_out` of every layer;
    *KL* = mean KL(clean || ablated) at the last position of `harmless_val`; *induce* = mean
    refusal score of `harmless_val` with `r` added (scale 1) to `resid_pre` of layer `l` at
    every position. Candidates are eligible when `l < n_layers * (1 - prune_last)` (integer
    cut, as Arditi et al.), KL <= `kl_threshold` and induce > `induce_threshold` (None turns a
    filter off). The eligible candidate with the lowest bypass score wins. When none is
    eligible, the unpruned candidate with the lowest bypass score among those that keep the
    KL limit (among all unpruned ones if none does) is returned with `passed_filters=False`
    and a warning: the model may not have a refusal direction that works both ways (or refuse
    at all). Without the KL preference the fallback tends to be a direction whose ablation
    simply breaks the model (SmolLM2: layer 2, KL 11, gibberish completions).

    Cost, and which scores are computed: the KL of every candidate comes first (one forward
    pass of `harmless_val` under ablation each). The bypass and induce scores are then
    computed only where they can decide the choice: bypass for the unpruned candidates
    within the KL limit (for every unpruned one when none is within it), induce for the
    unpruned ones within the KL limit, and for the chosen one. The choice is the same as with
    every score computed (tested); the others stay NaN. On SmolLM2, where 7 of 138 candidates
    keep the KL <= 0.1, this is about 40% of the work of scoring everything (16 instead of 32
    full passes and no partial one per candidate). `all_scores=True` scores every
    candidate (for maps of bypass and induce over layers and positions, as in Arditi et al.'s
    figures): a pass of both validation sets under ablation and one of `harmless_val` from
    the candidate's layer with the addition, per candidate. Restrict `layers` to save time.

    Args:
        model: the model.
        candidates: from `candidate_directions`.
        harmful_val, harmless_val: validation prompts (token-id lists).
        refusal_tokens: token ids whose probability makes the refusal score.
        kl_threshold: largest allowed KL on harmless prompts under ablation.
        induce_threshold: the harmless refusal score under addition must exceed this.
        prune_last: fraction of the last layers to leave out.
        layers: evaluate only these layers (default all unpruned ones).
        batch_size: prompts per forward pass.
        all_scores: score every candidate, not only those that can be chosen.
    """
    n_post, n_layers, d_model = candidates.shape
    if n_layers != model.cfg.n_layers or d_model != model.cfg.d_model:
        raise ValueError(
            f"candidates have shape {tuple(candidates.shape)}; expected [n_post, n_layers="
            f"{model.cfg.n_layers}, d_model={model.cfg.d_model}]"
        )
    if not 0 <= prune_last < 1:
        raise ValueError(f"prune_last must be in [0, 1), got {prune_last}")
    cutoff = int(n_layers * (1 - prune_last)) if prune_last > 0 else n_layers
    chosen_layers = sorted(set(range(cutoff) if layers is None else layers))
    bad = [layer for layer in chosen_layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {n_layers} layers")
    harmful_val, harmless_val = list(harmful_val), list(harmless_val)
    both = harmful_val + harmless_val
    n_h = len(harmful_val)

    runs = {name: SharedPrefix(model, p, batch_size)
            for name, p in (("both", both), ("harmful", harmful_val), ("harmless", harmless_val))}
    clean_harmless = runs["harmless"].logits()
    base_harmful = refusal_log_odds(runs["harmful"].logits(), refusal_tokens)
    base_harmless = refusal_log_odds(clean_harmless, refusal_tokens)

    nan = torch.full((n_post, n_layers), float("nan"))
    bypass, induce, kl = nan.clone(), nan.clone(), nan.clone()
    largest = max(1.0, float(candidates.norm(dim=-1).max()))
    # identical activations in both sets give a zero candidate: no direction, not evaluated
    todo = [(i, layer) for i in range(n_post) for layer in chosen_layers
            if candidates[i, layer].norm() >= 1e-6 * largest]
    pruned = torch.arange(n_layers) >= cutoff

    def ablation(i: int, layer: int) -> _hooks.Hook:
        return _hooks.ablate_direction(model, candidates[i, layer].float())

    def score_induce(i: int, layer: int) -> None:
        added = runs["harmless"].logits(_hooks.steer(model, candidates[i, layer].float(),
                                                     layers=[layer]), start_layer=layer)
        induce[i, layer] = refusal_log_odds(added, refusal_tokens).mean()

    with inference_layout(model):
        if all_scores:
            for i, layer in todo:
                ablated = runs["both"].logits(ablation(i, layer))
                bypass[i, layer] = refusal_log_odds(ablated[:n_h], refusal_tokens).mean()
                kl[i, layer] = _kl(clean_harmless, ablated[n_h:]).mean()
                score_induce(i, layer)
        else:
            for i, layer in todo:
                kl[i, layer] = _kl(clean_harmless, runs["harmless"].logits(ablation(i, layer))).mean()
            unpruned = [(i, layer) for i, layer in todo if not pruned[layer]]
            within = [c for c in unpruned if kl_threshold is None or kl[c] <= kl_threshold]
            # the choice reads bypass over the pool of `fallback_pool`, which lies inside
            # `within` unless `within` is empty; eligibility reads induce inside `within`
            for i, layer in within or unpruned:
                bypass[i, layer] = refusal_log_odds(runs["harmful"].logits(ablation(i, layer)),
                                                    refusal_tokens).mean()
            if induce_threshold is not None:
                for i, layer in within:
                    score_induce(i, layer)
    evaluated = ~kl.isnan()
    eligible = evaluated & ~bypass.isnan() & ~pruned[None, :]
    if kl_threshold is not None:
        eligible &= kl <= kl_threshold
    if induce_threshold is not None:
        eligible &= induce > induce_threshold
    scores = DirectionScores(bypass, induce, kl, eligible, float(base_harmful.mean()),
                             float(base_harmless.mean()))
    pool = fallback_pool(eligible, evaluated & ~pruned[None, :], kl, kl_threshold)
    if not bool(pool.any()):
        raise ValueError("no candidate direction could be evaluated (all zero or pruned)")
    passed = bool(eligible.any())
    if not passed:
        warnings.warn(
            "no candidate refusal direction passed the filters (KL <= "
            f"{kl_threshold}, induce > {induce_threshold}); taking the lowest bypass score "
            "among unpruned candidates within the KL limit (all unpruned ones if none is). "
            "The model may barely refuse."
        )
    masked = torch.where(pool, bypass, torch.full_like(bypass, float("inf")))
    flat = int(masked.argmin())
    i, layer = divmod(flat, n_layers)
    if induce[i, layer].isnan():  # a fallback outside the KL limit: report its induce score too
        with inference_layout(model):
            score_induce(i, layer)
    return RefusalDirection(
        direction=candidates[i, layer].clone(), layer=layer, position=i - n_post,
        passed_filters=passed, candidates=candidates, scores=scores,
    )


def fallback_pool(
    eligible: Bool[Tensor, "pos layer"],
    usable: Bool[Tensor, "pos layer"],
    kl: Float[Tensor, "pos layer"],
    kl_threshold: float | None,
) -> Bool[Tensor, "pos layer"]:
    """The candidates `select_direction` picks the lowest bypass score from: the eligible ones;
    if there are none, the usable (evaluated, unpruned) ones within the KL limit; if there are
    none of those either, every usable one."""
    if bool(eligible.any()):
        return eligible
    if kl_threshold is not None and bool((usable & (kl <= kl_threshold)).any()):
        return usable & (kl <= kl_threshold)
    return usable


def find_refusal_direction(
    model: HookedTransformer,
    harmful_train: Prompts,
    harmless_train: Prompts,
    harmful_val: Prompts,
    harmless_val: Prompts,
    refusal_tokens: Sequence[int],
    n_post: int,
    batch_size: int = 16,
    **select_kwargs: Any,
) -> RefusalDirection:
    """`candidate_directions` on the training prompts, then `select_direction` on the
    validation prompts (keyword arguments go to `select_direction`)."""
    candidates = candidate_directions(model, harmful_train, harmless_train, n_post,
                                      batch_size=batch_size)
    return select_direction(model, candidates, harmful_val, harmless_val, refusal_tokens,
                            batch_size=batch_size, **select_kwargs)


# --------------------------------------------------------------------------------------------
# Generation-based refusal rate
# --------------------------------------------------------------------------------------------


@dataclass
class RefusalRate:
    """Generation-based refusal rate (see `refusal_rate`).

    Attributes:
        rate: fraction of completions judged refusals.
        refused: one flag per prompt.
        completions: the greedy completions.
    """

    rate: float
    refused: list[bool]
    completions: list[str] = field(repr=False)


def refusal_rate(
    model: HookedTransformer,
    prompts: Prompts,
    hooks: Sequence[_hooks.Hook] | _hooks.Hook | None = (),
    max_new_tokens: int = 64,
    batch_size: int = 16,
    phrases: Sequence[str] = REFUSAL_PHRASES,
) -> RefusalRate:
    """Fraction of prompts whose greedy completion contains a refusal phrase.

    Completions of `max_new_tokens` tokens (stopping at end of turn) are generated with
    `interp.concepts.vectors.generate_with` (hooks attached for the whole generation, e.g.
    `direction.ablation(model)`), then judged by `is_refusal`. Substring matching is the
    judge of Arditi et al.'s first evaluation: it misses refusals that use none of the
    phrases and counts compliant text that happens to contain one.
    """
    if model.tokenizer is None:
        raise ValueError("refusal_rate judges decoded text, so it needs a model with a tokenizer")
    gen: Generation = generate_with(model, list(prompts), hooks=_as_hook_list(hooks),
                                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    assert gen.texts is not None
    refused = [is_refusal(t, phrases) for t in gen.texts]
    return RefusalRate(sum(refused) / len(refused), refused, gen.texts)
