"""Batched generation under hooks: left padding, KV cache, greedy or sampled, chat dialogues.

`generate_with(model, prompts, hooks, ...)` runs a `HookedTransformer` autoregressively with
`interp.hooks` hooks attached for the whole generation, prompt and generated tokens alike:

- **Batching.** Prompts are sorted by length, grouped into batches (`batch_size`, or as many
  rows as fit `memory_gb`, see `batch_size_for_memory`) and left-padded with an attention
  mask, so every row ends at the same position and TransformerLens shifts each row's positions
  past its pads (rotary and learned positions alike). Results come back in the prompts' order.
- **KV cache.** Keys and values live in buffers allocated once per batch (`PreallocatedKVCache`)
  instead of TransformerLens's cache, which concatenates the whole cache at every step; the
  values are the same, only the copies go. Weights are kept in `interp.layout.inference_layout`
  during generation (bit-identical outputs without TransformerLens's per-call weight copies),
  and only the last position goes through the unembedding.
- **Decoding.** Greedy by default (`temperature=0`); sampling with `temperature`, `top_p`,
  `top_k` and a `seed`. Each prompt has its own `torch.Generator`, seeded from `(seed, index of
  the prompt)`, which draws one uniform number per generated token; the token is the inverse
  CDF of the (filtered) distribution at that number. So a prompt's sample does not depend on
  which other prompts share its batch, on `batch_size`, or on the order of the prompts.
- **Stopping.** Per-row stop tokens (default: EOS and the end-of-turn token) and stop strings
  (a row stops once its decoded completion contains one; the text is cut before it, or after it
  with `keep_stop_string=True`).
- **Hooks from a marked position on.** `start=` makes the given hooks act, in each row, from one
  prompt token onward through every generated token: a `Marker("Trial 1", offset=-1)` (the
  token before the one where "Trial 1" begins, found per row through the tokenizer's character
  offsets), an int (a token index within the prompt; negative counts from the prompt's end) or
  a per-row list of these with None for control rows (no intervention). It becomes a per-row
  `from_position` of `interp.hooks.Selection`, in the padded frame of each batch.
- **Dialogues.** `dialogue(model, turns, prefill=...)` renders a multi-turn chat with the
  tokenizer's chat template (or, for base models, a plain `User: ... / Assistant: ...` format)
  and an optional forced start of the assistant's answer.

Caveats. Batched and cached decoding is not bit-identical to decoding each prompt alone by
full recomputation: matrix products of other shapes round differently in float32, so a
near-tie between the two best tokens can flip, after which the continuations differ (rare,
and rarer in float64). For the same reason a sampled token can differ across batch sizes when
the uniform draw lands within rounding distance of a boundary between two tokens. Positions
under left padding: a hook with an absolute position of its own (`positions=3`,
`from_position=3`) counts in the padded frame, where index 3 is a different token in each row;
positions counted from the end (-1) are the same token in every row; `start=` converts
positions within each prompt for you. Hook points outside the blocks (`hook_embed`,
`ln_final.*`) do not see the KV-cache offset (see `interp.hooks`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Literal, Union

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.components import AbstractAttention
from transformer_lens.utilities.activation_functions import apply_softcap

from interp import hooks as _hooks
from interp.layout import inference_layout
from interp.tokens import tokenize

__all__ = [
    "END_OF_TURN_TOKENS",
    "Generation",
    "Marker",
    "last_position_logits",
    "PreallocatedKVCache",
    "batch_size_for_memory",
    "cached_attention",
    "default_stop_tokens",
    "dialogue",
    "generate_with",
    "left_pad",
    "memory_per_row",
    "next_token_logits",
    "pad_id",
    "resolve_start",
    "supports_cached_attention",
    "token_lists",
]

Prompts = Union[
    str, Sequence[str], Sequence[Sequence[int]], Int[Tensor, "batch pos"], Int[Tensor, " pos"]
]
Hooks = Union[Sequence[_hooks.Hook], _hooks.Hook, None]

#: End-of-turn tokens of common chat formats; each one the tokenizer knows is a default stop.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """Completions of a batch of prompts (see `generate_with`), in the prompts' order.

    Attributes:
        prompt_tokens: the prompt token ids of each row (unpadded).
        tokens: the generated token ids of each row, without the prompt. A row that hit a stop
            token ends with it; a row stopped by a stop string keeps every token up to the one
            that completed the string.
        texts: the completions decoded (special tokens removed; cut at a stop string), or None
            for a model without a tokenizer.
        stopped_by: per row, `"token"`, `"string"` or `"length"` (ran to `max_new_tokens`).
        starts: per row, the prompt token index from which `start=` hooks acted (None: not
            at all, or no `start` given).
    """

    prompt_tokens: list[list[int]]
    tokens: list[list[int]]
    texts: list[str] | None
    stopped_by: list[str] = dataclasses.field(default_factory=list)
    starts: list[int | None] = dataclasses.field(default_factory=list)

    @property
    def text(self) -> str:
        """The completion of the first (or only) prompt."""
        if self.texts is None:
            raise ValueError("the model has no tokenizer: read .tokens instead")
        return self.texts[0]


def token_lists(
    model: HookedTransformer,
    prompts: Prompts,
    chat: bool = False,
    prepend_bos: bool | None = None,
) -> list[list[int]]:
    """Prompts as lists of token ids, one per prompt.

    Args:
        model: gives the tokenizer.
        prompts: a string, a list of strings, a list of token-id lists, or an int tensor
            `[pos]` / `[batch, pos]` (taken as it is, rows unpadded).
        chat: wrap each string in the tokenizer's chat template as one user turn with the
            generation prompt (`<|im_start|>assistant\\n` for SmolLM2), as
            `interp.tokens.tokenize` does (an error for token ids).
        prepend_bos: for plain strings; default `model.cfg.default_prepend_bos`. A string that
            already starts with the BOS token (a chat template that writes it) gets no second.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point() or prompts.ndim not in (1, 2):
            raise ValueError(f"token prompts must be an int tensor [pos] or [batch, pos], got "
                             f"{prompts.dtype} {tuple(prompts.shape)}")
        return [row.tolist() for row in (prompts[None] if prompts.ndim == 1 else prompts)]
    items = [p.reshape(-1).tolist() if isinstance(p, Tensor) else p for p in prompts]
    ids, _ = tokenize(model, items, chat_template=chat, prepend_bos=prepend_bos)
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    if bos is not None and all(isinstance(p, str) for p in items):
        ids = [x[1:] if len(x) > 1 and x[0] == x[1] == bos else x for x in ids]
    return ids


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int = 0, device: str | torch.device = "cpu"
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad token lists into `(tokens, attention_mask)`, so that all rows end together.

    With an explicit attention mask TransformerLens ignores the pads and shifts rotary and
    learned positions per row, so the last position's logits equal those of the unpadded row
    (up to float rounding), and position `-k` is the k-th last token of every row.
    """
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            tokens[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return tokens.to(device), mask.to(device)


def pad_id(model: HookedTransformer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0.

    Pads are masked out of attention, so the choice only matters for readability.
    """
    tok = model.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    if tok is not None and tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    return 0


def default_stop_tokens(model: HookedTransformer) -> list[int]:
    """The tokenizer's EOS id plus every token of `END_OF_TURN_TOKENS` it knows ([] without one)."""
    tok = model.tokenizer
    if tok is None:
        return []
    stops = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
    vocab = tok.get_vocab()
    stops += [int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted(set(stops))


# --------------------------------------------------------------------------------------------
# Dialogues
# --------------------------------------------------------------------------------------------


def dialogue(
    model: HookedTransformer,
    turns: Sequence[str] | Sequence[Mapping[str, str]],
    prefill: str | None = None,
    system: str | None = None,
    format: Literal["template", "plain"] = "template",
) -> str:
    """A multi-turn chat prompt as text, ending where the assistant's next answer begins.

    `turns` alternate user, assistant, user, ... and end with a user turn: for the
    introspection protocol `["<instructions>", "Ok.", "Trial 1: do you detect ...?"]`. The text
    ends with the generation prompt of the assistant's turn, followed by `prefill` when given:
    a forced start of the answer that generation continues (`"Yes, I detect an injected
    thought. The thought is about"`).

    Formats:
        - `"template"` (default): the tokenizer's chat template (`apply_chat_template` with
          `add_generation_prompt=True`), with `prefill` appended to the text as it is.
          Tokenising the returned text without special tokens added (as `generate_with` does
          for strings; the template's own special tokens are recognised in the text) gives the
          ids `apply_chat_template(..., tokenize=True)` gives.
        - `"plain"`: for base models without a template (Gemma-3-270m):
          `"System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nUser: ...\\n\\nAssistant:"`,
          then `" " + prefill`. Feed it with the model's usual BOS handling.

    Args:
        model: gives the tokenizer (and its template).
        turns: strings (roles alternate, starting with the user) or `{"role", "content"}` dicts
            with roles `user`/`assistant`, mixed freely; a leading `system` dict is allowed.
        prefill: the start of the assistant's answer, or None.
        system: a system message before the first turn.
        format: `"template"` or `"plain"`.

    Raises:
        ValueError: no turns; roles that do not alternate or do not end with the user; the
            template format for a tokenizer without a chat template (use `format="plain"`).
    """
    messages = _messages(turns, system)
    if format == "plain":
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        text = "".join(f"{names[m['role']]}: {m['content']}\n\n" for m in messages)
        return text + "Assistant:" + (f" {prefill}" if prefill else "")
    if format != "template":
        raise ValueError(f"format must be 'template' or 'plain', got {format!r}")
    tok = model.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError(
            f"{model.cfg.model_name} has no chat template; use dialogue(..., format='plain') for "
            "a base model, or a chat model such as smollm2-135m-instruct"
        )
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + (prefill or "")


def _messages(turns: Sequence[str] | Sequence[Mapping[str, str]], system: str | None) -> list[dict]:
    if isinstance(turns, str):
        raise TypeError("turns must be a list of turns, not one string; wrap it in a list")
    if not turns:
        raise ValueError("a dialogue needs at least one user turn")
    turns = list(turns)
    if isinstance(turns[0], Mapping) and turns[0].get("role") == "system":
        if system is not None:
            raise ValueError("give the system message once: as system= or as the first turn")
        system, turns = turns[0]["content"], turns[1:]
    roles = ["user", "assistant"]
    messages = [
        {"role": roles[i % 2], "content": t} if isinstance(t, str)
        else {"role": t["role"], "content": t["content"]}
        for i, t in enumerate(turns)
    ]
    if not messages:
        raise ValueError("a dialogue needs at least one user turn")
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(
                f"turn {i} has role {m['role']!r}, expected {expected!r}: turns alternate user, "
                "assistant, user, ... and end with a user turn"
            )
    if messages[-1]["role"] != "user":
        raise ValueError("the last turn must be the user's: the assistant answers it")
    return ([{"role": "system", "content": system}] if system is not None else []) + messages


# --------------------------------------------------------------------------------------------
# Where hooks start
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """A prompt position named by text: the token where `text` begins, moved by `offset` tokens.

    `Marker("Trial 1", offset=-1)` is the token just before the one where "Trial 1" begins. The
    token is found through the tokenizer's character offsets: the first token whose span ends
    after the marker's first character (so a marker that begins inside a token, e.g. after the
    space that BPE merges into " Trial", names that token).

    Attributes:
        text: the substring to look for in the prompt text.
        offset: tokens to move from there (-1: the token before).
        occurrence: which occurrence of `text`: 0 the first, -1 the last, ...
    """

    text: str
    offset: int = 0
    occurrence: int = 0


StartSpec = Union[Marker, int, None]
Start = Union[StartSpec, Sequence[StartSpec]]


def resolve_start(
    model: HookedTransformer, text: str | None, ids: Sequence[int], start: StartSpec
) -> int | None:
    """The prompt token index (0-based, within the unpadded prompt) that `start` names.

    Args:
        model: gives the tokenizer (for a `Marker`).
        text: the prompt text `ids` were tokenised from (None for token-id prompts).
        ids: the prompt's token ids (with the BOS token if one was prepended).
        start: a `Marker`, an int (negative counts from the prompt's end) or None.

    Returns:
        The index, or None when `start` is None.

    Raises:
        ValueError: a marker for a token-id prompt, a marker not in the text (or fewer
            occurrences than asked), a position outside the prompt.
    """
    if start is None:
        return None
    if isinstance(start, Marker):
        if text is None or model.tokenizer is None:
            raise ValueError(
                f"Marker({start.text!r}) needs a text prompt and a tokenizer; for token-id prompts "
                "give the start as a token index"
            )
        chars = [i for i in range(len(text)) if text.startswith(start.text, i)]
        if not chars or not -len(chars) <= start.occurrence < len(chars):
            raise ValueError(
                f"the prompt has {len(chars)} occurrence(s) of the marker {start.text!r} "
                f"(asked for occurrence {start.occurrence}): ...{text[-120:]!r}"
            )
        char = chars[start.occurrence]
        enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        shift = len(ids) - len(enc["input_ids"])  # a prepended BOS token
        if shift not in (0, 1) or list(ids[shift:]) != list(enc["input_ids"]):
            raise ValueError(
                "the prompt's tokens are not those of its text tokenised alone; cannot place "
                f"Marker({start.text!r})"
            )
        token = next(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > char)
        index = shift + token + start.offset
        what = f"Marker({start.text!r}, offset={start.offset})"
    elif isinstance(start, int) and not isinstance(start, bool):
        index = start if start >= 0 else len(ids) + start
        what = f"start {start}"
    else:
        raise TypeError(f"a start must be a Marker, an int or None, got {start!r}")
    if not 0 <= index < len(ids):
        raise ValueError(f"{what} is token {index}, outside the prompt of {len(ids)} tokens")
    return index


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def memory_per_row(model: HookedTransformer, length: int) -> int:
    """Rough bytes one sequence of `length` tokens needs while generating: its KV cache (keys
    and values of every layer) plus the working memory of one block on the whole prompt
    (residual copies, q/k/v and their rotated and head-repeated forms, attention scores and
    pattern, the MLP hidden layer) and one row of logits."""
    cfg = model.cfg
    size = torch.finfo(cfg.dtype).bits // 8
    kv_heads = cfg.n_key_value_heads or cfg.n_heads
    kv = 2 * cfg.n_layers * kv_heads * cfg.d_head * length
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    block = length * (8 * cfg.d_model + 3 * d_mlp + 6 * cfg.n_heads * cfg.d_head)
    block += 3 * cfg.n_heads * length * length
    return (kv + block + 2 * cfg.d_vocab) * size


def batch_size_for_memory(
    model: HookedTransformer, length: int, memory_gb: float, max_rows: int | None = None
) -> int:
    """Rows of `length` tokens (prompt plus new tokens) that fit `memory_gb` (at least 1).

    See `memory_per_row` for what is counted; weights are not.
    """
    if memory_gb <= 0:
        raise ValueError(f"memory_gb must be > 0, got {memory_gb}")
    rows = max(1, int(memory_gb * 2**30 // memory_per_row(model, length)))
    return min(rows, max_rows) if max_rows is not None else rows


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


class _PreallocatedEntry(TransformerLensKeyValueCacheEntry):
    """One layer's keys and values in buffers of a fixed capacity; a subclass of
    TransformerLens's `TransformerLensKeyValueCacheEntry` (same `past_keys`, `past_values`,
    `append`), except that `append` writes into the buffers instead of concatenating (and
    `past_keys`/`past_values` are read-only views, so the dataclass `__init__` is not used).

    The buffers are `[batch, kv_head, capacity, d_head]` (the layout attention reads them in);
    `past_keys`/`past_values` are `[batch, pos, kv_head, d_head]` views, as TransformerLens
    expects. `rotated` says whether the keys are stored after the rotary embedding
    (`cached_attention`) or before it (TransformerLens's own attention).
    """

    def __init__(self, keys: Tensor, values: Tensor, rotated: bool) -> None:
        self.keys, self.values = keys, values
        self.rotated = rotated
        self.length = 0
        self.frozen = False

    @property
    def past_keys(self) -> Float[Tensor, "batch pos kv_head d_head"]:
        return self.keys[:, :, : self.length].transpose(1, 2)

    @property
    def past_values(self) -> Float[Tensor, "batch pos kv_head d_head"]:
        return self.values[:, :, : self.length].transpose(1, 2)

    def append(
        self,
        new_keys: Float[Tensor, "batch new kv_head d_head"],
        new_values: Float[Tensor, "batch new kv_head d_head"],
    ) -> tuple[Float[Tensor, "batch pos kv_head d_head"], Float[Tensor, "batch pos kv_head d_head"]]:
        end = self.length + new_keys.shape[1]
        if end > self.keys.shape[2]:
            raise RuntimeError(
                f"the KV cache holds {self.keys.shape[2]} positions; {end} were asked for"
            )
        self.keys[:, :, self.length:end] = new_keys.transpose(1, 2)
        self.values[:, :, self.length:end] = new_values.transpose(1, 2)
        if not self.frozen:
            self.length = end
        return (self.keys[:, :, :end].transpose(1, 2), self.values[:, :, :end].transpose(1, 2))


class PreallocatedKVCache(TransformerLensKeyValueCache):
    """A TransformerLens KV cache whose keys and values are written into buffers allocated once.

    TransformerLens's own cache concatenates every layer's keys and values with the new ones at
    every step (a copy of the whole cache per token). This one holds `capacity` positions per
    layer and writes each new token in place; the model reads views of the filled part, which
    hold the same values. With `rotated=False` it works with TransformerLens's attention
    wherever `model(..., past_kv_cache=...)` takes a cache; with `rotated=True` it holds keys
    after the rotary embedding and needs `cached_attention` (which `generate_with` sets up).
    """

    @classmethod
    def allocate(
        cls, model: HookedTransformer, batch: int, capacity: int, rotated: bool = False
    ) -> PreallocatedKVCache:
        """An empty cache for `batch` rows of up to `capacity` tokens."""
        cfg = model.cfg
        heads = cfg.n_key_value_heads or cfg.n_heads
        if getattr(cfg, "ungroup_grouped_query_attention", False):
            heads = cfg.n_heads
        device = cfg.device
        entries = [
            _PreallocatedEntry(
                torch.empty(batch, heads, capacity, cfg.d_head, dtype=cfg.dtype, device=device),
                torch.empty(batch, heads, capacity, cfg.d_head, dtype=cfg.dtype, device=device),
                rotated,
            )
            for _ in range(cfg.n_layers)
        ]
        mask = torch.empty((batch, 0), dtype=torch.int, device=device)
        return cls(entries=entries, previous_attention_mask=mask)


# --------------------------------------------------------------------------------------------
# Attention over the cache
# --------------------------------------------------------------------------------------------


def supports_cached_attention(model: HookedTransformer) -> bool:
    """Whether `cached_attention` handles this model's attention (else TransformerLens's own
    attention runs, with the cache of unrotated keys): causal attention with rotary or learned
    positions, without split per-head inputs, per-head results, ALiBi, attention sinks, log-n
    scaling, dynamic NTK rotary, clipped or OLMo-normed q/k or 4-bit weights."""
    cfg = model.cfg
    if cfg.positional_embedding_type not in ("rotary", "standard"):
        return False
    flags = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_logn_attn",
             "use_attention_sinks", "use_dynamic_ntk_rope", "load_in_4bit")
    if any(getattr(cfg, f, False) for f in flags) or getattr(cfg, "clip_qkv", None) is not None:
        return False
    if cfg.attention_dir != "causal" or "Olmo" in str(cfg.original_architecture):
        return False
    return all(getattr(b.attn, "_attention_dir_override", None) is None for b in model.blocks)


def cached_attention(
    attn: AbstractAttention,
    query_input: Float[Tensor, "batch pos d_model"],
    key_input: Float[Tensor, "batch pos d_model"],
    value_input: Float[Tensor, "batch pos d_model"],
    past_kv_cache_entry: _PreallocatedEntry | None = None,
    additive_attention_mask: Tensor | None = None,
    attention_mask: Int[Tensor, "batch offset_pos"] | None = None,
    position_bias: Tensor | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """TransformerLens attention over a cache of *rotated* keys, for generation.

    TransformerLens caches keys before the rotary embedding and, at every step, rotates the
    whole cache again and repeats the key and value heads for grouped-query attention (both
    O(sequence) copies per layer and token). Here the new keys are rotated once, with the same
    TransformerLens function and positions (so the same values), and stored rotated; query
    heads are grouped onto their key-value head instead of repeating the keys and values. The
    rest is TransformerLens's computation: its q/k/v projections (and q/k norms), causal and
    padding mask (and local windows), soft cap, softmax and output projection, with every hook
    point firing on the same activations. One difference: `hook_rot_k` sees the new keys only
    (TransformerLens shows it the whole re-rotated sequence at each step), so its positions
    follow the cache offset like every other hook point's.

    Without a rotated-key cache entry it is TransformerLens's own forward.
    """
    entry = past_kv_cache_entry
    if not (isinstance(entry, _PreallocatedEntry) and entry.rotated) or (
        additive_attention_mask is not None or position_bias is not None
    ):
        return type(attn).forward(attn, query_input, key_input, value_input, entry,
                                  additive_attention_mask, attention_mask, position_bias)
    cfg = attn.cfg
    q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
    offset = entry.length
    if cfg.positional_embedding_type == "rotary":
        q = attn.hook_rot_q(attn.apply_rotary(q, offset, attention_mask))
        k = attn.hook_rot_k(attn.apply_rotary(k, offset, attention_mask))
    keys, values = entry.append(k, v)  # [batch, key_pos, kv_head, d_head] views
    group = q.shape[2] // keys.shape[2]
    q_grouped = einops.rearrange(q, "b p (kv g) d -> b kv (g p) d", g=group)
    scores = q_grouped @ einops.rearrange(keys, "b k kv d -> b kv d k") / attn.attn_scale
    scores = einops.rearrange(scores, "b kv (g p) k -> b (kv g) p k", g=group)
    scores = apply_softcap(scores, cfg.attn_scores_soft_cap)
    scores = attn.hook_attn_scores(attn.apply_causal_mask(scores, offset, attention_mask))
    pattern = torch.softmax(scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    pattern = attn.hook_pattern(pattern).to(values.dtype)
    z = einops.rearrange(pattern, "b (kv g) p k -> b kv (g p) k", g=group)
    z = z @ einops.rearrange(values, "b k kv d -> b kv k d")
    z = attn.hook_z(einops.rearrange(z, "b kv (g p) d -> b p (kv g) d", g=group))
    w = einops.rearrange(attn.W_O, "h d m -> m (h d)").contiguous()  # a view under the layout
    return F.linear(einops.rearrange(z, "b p h d -> b p (h d)"), w, attn.b_O)


@contextmanager
def _attention_over_rotated_cache(model: HookedTransformer) -> Iterator[None]:
    """Within the context every block's attention runs `cached_attention`."""
    attns = [block.attn for block in model.blocks]
    try:
        for attn in attns:
            attn.forward = partial(cached_attention, attn)
        yield
    finally:
        for attn in attns:
            attn.__dict__.pop("forward", None)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def last_position_logits(
    model: HookedTransformer, resid: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch d_vocab"]:
    """Logits at the last position of the final residual stream (final norm, unembedding and
    the output soft cap, as `HookedTransformer.forward` applies them). Only the last position
    goes through the final norm, so hooks on `ln_final.*` see that position alone."""
    resid = resid[:, -1:]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    logits = model.unembed(resid)[:, 0]
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _row_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for prompt `index`, stable across runs and platforms."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _sample(
    logits: Float[Tensor, "batch d_vocab"],
    generators: Sequence[torch.Generator],
    temperature: float,
    top_p: float,
    top_k: int | None,
) -> Int[Tensor, " batch"]:
    """One token per row: inverse CDF of the filtered softmax at one uniform draw per row."""
    x = logits.double() / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -math.inf)
    probs = torch.softmax(x, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each token
        probs = probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    u = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)
    # A token of zero probability can only be reached by rounding at the top end; step back.
    while True:
        zero = probs.gather(-1, pick) == 0
        if not bool(zero.any()):
            break
        pick = torch.where(zero, pick - 1, pick).clamp_min(0)
    pick = pick.squeeze(-1)
    return pick if order is None else order.gather(-1, pick[:, None]).squeeze(-1)


def _per_row(value, n: int, what: str, item_type: type) -> list | None:
    """A shared value (one item or a flat list of items) or a per-row list of lists/None."""
    if value is None:
        return None
    if isinstance(value, (item_type, str)) and not isinstance(value, bool):
        return [[value]] * n
    items = list(value)
    if all(isinstance(v, item_type) and not isinstance(v, bool) for v in items):
        return [items] * n
    if len(items) != n:
        raise ValueError(
            f"per-row {what} needs one entry (a list, or None) per prompt: got {len(items)} "
            f"entries for {n} prompts"
        )
    out = []
    for v in items:
        if v is None:
            out.append(None)
        elif isinstance(v, (item_type, str)):
            out.append([v])
        else:
            out.append(list(v))
    return out


@torch.no_grad()
def generate_with(
    model: HookedTransformer,
    prompts: Prompts,
    hooks: Hooks = (),
    max_new_tokens: int = 32,
    chat: bool = False,
    batch_size: int | None = None,
    stop_tokens: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
    prepend_bos: bool | None = None,
    *,
    start: Start = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_strings: str | Sequence[str] | Sequence[Sequence[str] | None] | None = None,
    keep_stop_string: bool = False,
    memory_gb: float = 2.0,
    progress: bool = True,
) -> Generation:
    """Generate with hooks attached, batched (left padding) and with a KV cache.

    See the module docstring for batching, the cache, sampling and its seeding, stop rules and
    the caveats (float rounding can flip a near-tie; positions under left padding).

    Args:
        model: the model.
        prompts: text(s), token-id lists or an int tensor (see `token_lists`); strings from
            `dialogue` for multi-turn chats with a prefill.
        hooks: hooks from `interp.hooks` (steer, ablate_direction, patch, capture, ...),
            attached for the whole generation. Hooks already attached to the model (a `with`
            block around the call) stay active too.
        max_new_tokens: most tokens generated per prompt.
        chat: wrap each string in the chat template as one user turn plus the generation prompt.
        batch_size: most prompts per batch; None: as many as fit `memory_gb`.
        stop_tokens: token ids that end a row (kept as its last token): a list shared by every
            row, or a list with one list (or None: the default) per prompt. Default: the
            tokenizer's EOS and end-of-turn tokens (`default_stop_tokens`). `()`: never stop.
        prepend_bos: for plain-text prompts; default `model.cfg.default_prepend_bos`.
        start: where `hooks` start acting in each row: a `Marker`, an int (token index within
            the prompt; negative counts from its end) or a per-row list of these, None for a
            row that `hooks` leave alone. The hooks then act from that token through every
            generated token (they must not select positions themselves). None (default): the
            hooks act as they were built.
        temperature: 0 for greedy decoding (default), else the softmax temperature.
        top_p: nucleus sampling: keep the most likely tokens whose mass reaches `top_p`.
        top_k: keep only the `top_k` most likely tokens (None: all).
        seed: sampling seed; prompt i draws from a generator seeded by `(seed, i)`.
        stop_strings: a row ends once its decoded completion contains one of these: a string
            or list of strings for every row, or one list (or None) per prompt.
        keep_stop_string: keep the stop string at the end of the text (default: cut before it).
        memory_gb: budget of one batch when `batch_size` is None (see `memory_per_row`).
        progress: show a tqdm progress bar (tokens generated).

    Returns:
        A `Generation` in the prompts' order.

    Raises:
        ValueError: bad argument values (the message says which); prompt plus new tokens
            longer than the model's context; a hook that selects positions given with `start`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None), got {batch_size}")
    if temperature < 0 or not 0 < top_p <= 1 or (top_k is not None and top_k < 1):
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 1 or None; got "
            f"temperature={temperature}, top_p={top_p}, top_k={top_k}"
        )
    hook_list = [] if hooks is None else [hooks] if isinstance(hooks, _hooks.Hook) else list(hooks)
    texts = _prompt_texts(model, prompts, chat)
    rows = token_lists(model, prompts, chat=chat, prepend_bos=prepend_bos)
    n = len(rows)
    longest = max(len(r) for r in rows) + max_new_tokens
    if longest > model.cfg.n_ctx:
        raise ValueError(
            f"the longest prompt plus max_new_tokens is {longest} tokens, more than the model's "
            f"context of n_ctx={model.cfg.n_ctx}; shorten the prompts or max_new_tokens"
        )
    starts = _starts(model, texts, rows, start, hook_list)
    tok = model.tokenizer
    default_stops = default_stop_tokens(model)
    stop_sets = _per_row(stop_tokens, n, "stop_tokens", int)
    stop_ids = [set(default_stops if s is None else s) for s in (stop_sets or [None] * n)]
    strings = _per_row(stop_strings, n, "stop_strings", str)
    if strings is not None and tok is None:
        raise ValueError("stop_strings need a tokenizer to decode completions; use stop_tokens")
    greedy = temperature == 0
    generators = [] if greedy else [torch.Generator().manual_seed(_row_seed(seed, i)) for i in range(n)]

    order = sorted(range(n), key=lambda i: -len(rows[i]))  # stable: ties keep their order
    device = model.cfg.device
    pad = pad_id(model)
    generated: list[list[int]] = [[] for _ in range(n)]
    stopped_by = ["length"] * n
    selections = [h.selection for h in hook_list]
    attached: list[_hooks.Hook] = []
    bar = tqdm(total=n * max_new_tokens, unit="tok", desc="generate", disable=not progress)
    try:
        for h in hook_list:
            attached.append(h.attach(model))
        fast = supports_cached_attention(model)
        with inference_layout(model, keep_originals=True), (
            _attention_over_rotated_cache(model) if fast else nullcontext()
        ):
            i = 0
            while i < n:
                width = len(rows[order[i]])
                cap = batch_size or batch_size_for_memory(model, width + max_new_tokens, memory_gb)
                chunk = order[i:i + cap]
                i += len(chunk)
                tokens, mask = left_pad([rows[j] for j in chunk], pad, device)
                if start is not None:
                    # The start of each row in this batch's padded frame (None: left alone).
                    per_row = tuple(
                        None if starts[j] is None else width - len(rows[j]) + starts[j]
                        for j in chunk
                    )
                    for h, selection in zip(hook_list, selections):
                        h.selection = dataclasses.replace(selection, from_position=per_row)
                _decode_batch(
                    model, chunk, tokens, mask, fast, max_new_tokens, greedy,
                    [generators[j] for j in chunk] if not greedy else [],
                    temperature, top_p, top_k, stop_ids, strings, pad, generated, stopped_by, bar,
                )
    finally:
        bar.close()
        for h in reversed(attached):
            h.detach()
        for h, selection in zip(hook_list, selections):
            h.selection = selection
    out_texts = None
    if tok is not None:
        out_texts = []
        for j, g in enumerate(generated):
            text = tok.decode(g, skip_special_tokens=True)
            if stopped_by[j] == "string":
                text = _cut(text, strings[j] or [], keep_stop_string)  # type: ignore[index]
            out_texts.append(text)
    return Generation(rows, generated, out_texts, stopped_by, starts)


def _decode_batch(
    model: HookedTransformer,
    chunk: list[int],
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    rotated: bool,
    max_new_tokens: int,
    greedy: bool,
    generators: Sequence[torch.Generator],
    temperature: float,
    top_p: float,
    top_k: int | None,
    stop_ids: list[set[int]],
    strings: list[list[str] | None] | None,
    pad: int,
    generated: list[list[int]],
    stopped_by: list[str],
    bar: tqdm,
) -> None:
    """Decode one left-padded batch; writes each row's tokens into `generated[chunk[b]]`."""
    batch = len(chunk)
    device = tokens.device
    cache = PreallocatedKVCache.allocate(
        model, batch, tokens.shape[1] + max_new_tokens - 1, rotated=rotated
    )
    active = list(range(batch))  # rows still generating
    resid = model(tokens, attention_mask=mask, past_kv_cache=cache,
                  stop_at_layer=model.cfg.n_layers)
    logits = last_position_logits(model, resid)
    ones = torch.ones((batch, 1), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = _sample(logits, generators, temperature, top_p, top_k)
        values = nxt.tolist()
        still = []
        for b in active:
            j = chunk[b]
            generated[j].append(values[b])
            if values[b] in stop_ids[j]:
                stopped_by[j] = "token"
            elif strings is not None and strings[j] and _contains(model, generated[j], strings[j]):
                stopped_by[j] = "string"
            else:
                still.append(b)
        remaining = max_new_tokens - step - 1
        bar.update(len(active) + (len(active) - len(still)) * remaining)
        active = still
        if not active or remaining == 0:
            break
        if len(active) < batch:  # finished rows read a pad (masked in, output discarded)
            keep = set(active)
            values = [v if b in keep else pad for b, v in enumerate(values)]
            nxt = torch.tensor(values, dtype=torch.long, device=device)
        resid = model(nxt[:, None], attention_mask=ones, past_kv_cache=cache,
                      stop_at_layer=model.cfg.n_layers)
        logits = last_position_logits(model, resid)


def _contains(model: HookedTransformer, ids: list[int], strings: Sequence[str]) -> bool:
    text = model.tokenizer.decode(ids, skip_special_tokens=True)
    return any(s in text for s in strings)


def _cut(text: str, strings: Sequence[str], keep: bool) -> str:
    """`text` up to the earliest stop string (included when `keep`)."""
    hits = [(text.find(s), s) for s in strings if s in text]
    if not hits:
        return text
    at, s = min(hits)
    return text[: at + len(s)] if keep else text[:at]


def _prompt_texts(model: HookedTransformer, prompts: Prompts, chat: bool) -> list[str | None]:
    """The text each prompt was tokenised from (rendered chat template when `chat`), or None."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        return [None] * (1 if prompts.ndim == 1 else prompts.shape[0])
    items = list(prompts)
    if not all(isinstance(p, str) for p in items):
        return [None] * len(items)
    if chat and model.tokenizer is not None and getattr(model.tokenizer, "chat_template", None):
        return [dialogue(model, [p]) for p in items]
    return list(items)


def _starts(
    model: HookedTransformer,
    texts: list[str | None],
    rows: list[list[int]],
    start: Start,
    hook_list: Sequence[_hooks.Hook],
) -> list[int | None]:
    """Per prompt, the token index from which the `start=` hooks act (None: not at all)."""
    n = len(rows)
    if start is None:
        return [None] * n
    if not hook_list:
        raise ValueError("start= says where hooks begin to act, but no hooks were given")
    for h in hook_list:
        if h.selection.positions is not None or h.selection.from_position is not None:
            raise ValueError(
                f"{h!r} selects positions itself; with start= every hook acts from the start "
                "position on. Build it without positions/from_position, or attach it around "
                "the call with `with` instead"
            )
    if isinstance(start, (Marker, int)) and not isinstance(start, bool):
        specs: list[StartSpec] = [start] * n
    else:
        specs = list(start)  # type: ignore[arg-type]
        if len(specs) != n:
            raise ValueError(f"start has {len(specs)} entries for {n} prompts; give one per prompt")
    return [resolve_start(model, texts[i], rows[i], specs[i]) for i in range(n)]


@torch.no_grad()
def next_token_logits(
    model: HookedTransformer,
    prompts: Prompts,
    hooks: Hooks = (),
    batch_size: int = 16,
) -> Float[Tensor, "n d_vocab"]:
    """Next-token logits after each prompt (float32, CPU), with `hooks` attached.

    `prompts` are anything `token_lists` takes (text with the model's default BOS handling,
    token-id lists, int tensors).

    Prompts are left-padded with an attention mask, so position -k is the k-th last token of
    every prompt (hooks with negative positions act on the same template token in each row).
    Only the last position goes through the unembedding.
    """
    prompts = token_lists(model, prompts)
    hook_list = [] if hooks is None else [hooks] if isinstance(hooks, _hooks.Hook) else list(hooks)
    device = model.cfg.device
    outs = []
    attached: list[_hooks.Hook] = []
    try:
        for h in hook_list:
            attached.append(h.attach(model))
        for first in range(0, len(prompts), batch_size):
            tokens, mask = left_pad(prompts[first:first + batch_size], pad_id(model), device)
            resid = model(tokens, attention_mask=mask, stop_at_layer=model.cfg.n_layers)
            outs.append(last_position_logits(model, resid).float().cpu())
    finally:
        for h in reversed(attached):
            h.detach()
    return torch.cat(outs)
