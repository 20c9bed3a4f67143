"""Training data: token sequences with a loss mask, and how they are batched.

Every objective in `interp.training` reads the same unit, an `Example`: the token ids of one
sequence and a boolean `loss_mask` of the same length that is True where the token is a
*target*, i.e. where the model's prediction of that token from its prefix enters the loss.
The first token can never be a target (nothing predicts it); its mask entry is ignored.

- **SFT pairs** (`sft_examples`): a prompt and a response. With a chat model the pair is
  formatted by the tokenizer's chat template (a user turn, then the assistant turn), the prompt
  part being exactly what `interp.concepts.collect.tokenize(..., chat_template=True)` gives
  for generation; only the assistant's tokens (its end-of-turn marker included, so the model
  learns to stop) are targets. Token-id pairs are concatenated as they are.
- **Plain text** (`text_chunks`, `text_examples`): an article cut into chunks at sentence
  ends, every token a target; the usual forget and retain sets of unlearning.
- **Preference pairs** (`preference_pairs`): one prompt with a preferred and a rejected
  response, for DPO; each side is an SFT example.

`collate` pads a list of examples on the right into a `Batch` with an attention mask. Right
padding is exact for training: under causal attention a real token never attends to the pads
after it, and the pads are neither attended to (the attention mask) nor targets (the loss
mask), so the pad id is irrelevant (0 is used). `batch_indices` gives the examples of the k-th
micro-batch of a seeded, epoch-wise shuffled stream: a pure function of `(k, seed)`, which is
what lets an interrupted run resume on exactly the batches it would have seen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.tokens import tokenize

__all__ = [
    "Batch",
    "Example",
    "PreferencePair",
    "batch_indices",
    "collate",
    "preference_pairs",
    "sft_example",
    "sft_examples",
    "text_chunks",
    "text_examples",
]

#: A prompt or response: text, or token ids used as they are.
Text = str | Sequence[int]


class Example(NamedTuple):
    """One training sequence.

    Attributes:
        tokens: token ids.
        loss_mask: same length; True where the token is a target of the loss (position 0,
            which nothing predicts, is ignored).
    """

    tokens: list[int]
    loss_mask: list[bool]

    @property
    def n_targets(self) -> int:
        return sum(self.loss_mask[1:])


class PreferencePair(NamedTuple):
    """One DPO item: the same prompt with a preferred and a rejected response.

    Attributes:
        chosen: the prompt followed by the preferred response (targets: the response).
        rejected: the prompt followed by the rejected response.
    """

    chosen: Example
    rejected: Example


class Batch(NamedTuple):
    """Right-padded examples.

    Attributes:
        tokens: `[batch, pos]` token ids (pads are 0).
        attention_mask: `[batch, pos]`, 1 on real tokens and 0 on pads.
        loss_mask: `[batch, pos]`, True on targets (never on pads, never at position 0).
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    loss_mask: Bool[Tensor, "batch pos"]

    def to(self, device: str | torch.device) -> Batch:
        return Batch(*(t.to(device) for t in self))


def _check_example(example: Example, what: str) -> Example:
    if len(example.tokens) != len(example.loss_mask):
        raise ValueError(f"{what}: {len(example.tokens)} tokens but a loss mask of "
                         f"{len(example.loss_mask)} entries; they must have the same length")
    if example.n_targets == 0:
        raise ValueError(f"{what} has no target tokens (its loss mask is False after position "
                         "0): it would contribute nothing to the loss; drop it or fix the mask")
    return example


def _ids(model: HookedTransformer, text: Text, what: str) -> list[int]:
    """Token ids of `text` without special tokens (token ids are returned as they are)."""
    if isinstance(text, str):
        if model.tokenizer is None:
            raise ValueError(f"{model.cfg.model_name} has no tokenizer, so the {what} must be "
                             "token ids (a list of ints), not a string")
        return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return [int(t) for t in text]


def sft_example(
    model: HookedTransformer,
    prompt: Text,
    response: Text,
    chat: bool | None = None,
    system_prompt: str | None = None,
    append_eos: bool = False,
) -> Example:
    """An (prompt, response) pair as one `Example` with the loss on the response only.

    Args:
        model: gives the tokenizer, its chat template and the BOS convention.
        prompt: text or token ids.
        response: text or token ids.
        chat: format with the chat template (one user turn and the assistant's answer);
            default: when both are strings and the tokenizer has a template. The prompt part
            then ends with the assistant header, exactly as generation sees it.
        system_prompt: a system message first (chat only; SmolLM2's template otherwise adds
            its default system message, as it does at generation time).
        append_eos: without the chat template, end the response with the EOS token (a
            target), so the model learns to stop.

    Raises:
        ValueError: strings for a model without a tokenizer; a chat template asked of a
            tokenizer without one; an empty response.
    """
    strings = isinstance(prompt, str) and isinstance(response, str)
    tok = model.tokenizer
    if chat is None:
        chat = strings and tok is not None and bool(getattr(tok, "chat_template", None))
    if chat:
        if not strings:
            raise ValueError("chat=True needs the prompt and response as strings")
        prompt_ids = tokenize(model, [prompt], chat_template=True, system_prompt=system_prompt,
                              max_tokens=10**9)[0][0]
        turns = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        turns += [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(turns + [{"role": "assistant", "content": response}],
                                       tokenize=False)
        if not full.startswith(head):
            raise ValueError(
                f"the chat template of {model.cfg.model_name} does not render the conversation "
                "with the answer as the generation prompt followed by the answer, so the "
                "response tokens cannot be separated; pass token ids (chat=False) instead"
            )
        response_ids = _ids(model, full[len(head):], "response")
    else:
        if system_prompt is not None:
            raise ValueError("system_prompt needs chat=True")
        prompt_ids = (tokenize(model, [prompt], max_tokens=10**9)[0][0]
                      if isinstance(prompt, str) else _ids(model, prompt, "prompt"))
        response_ids = _ids(model, response, "response")
        if append_eos:
            if tok is None or tok.eos_token_id is None:
                raise ValueError(f"append_eos=True but {model.cfg.model_name} has no EOS token")
            response_ids.append(int(tok.eos_token_id))
    if not response_ids:
        raise ValueError(f"the response to {str(prompt)[:40]!r} has no tokens")
    example = Example(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))
    if len(example.tokens) > model.cfg.n_ctx:
        raise ValueError(f"the example for {str(prompt)[:40]!r} has {len(example.tokens)} tokens, "
                         f"more than the model's context of {model.cfg.n_ctx}; shorten it")
    return _check_example(example, f"the example for {str(prompt)[:40]!r}")


def sft_examples(
    model: HookedTransformer,
    pairs: Sequence[tuple[Text, Text]],
    chat: bool | None = None,
    system_prompt: str | None = None,
    append_eos: bool = False,
) -> list[Example]:
    """`sft_example` for each `(prompt, response)` pair."""
    return [sft_example(model, p, r, chat=chat, system_prompt=system_prompt,
                        append_eos=append_eos) for p, r in pairs]


def preference_pairs(
    model: HookedTransformer,
    items: Sequence[tuple[Text, Text, Text]],
    chat: bool | None = None,
    system_prompt: str | None = None,
) -> list[PreferencePair]:
    """DPO items from `(prompt, chosen response, rejected response)` triples."""
    return [
        PreferencePair(sft_example(model, p, c, chat=chat, system_prompt=system_prompt),
                       sft_example(model, p, r, chat=chat, system_prompt=system_prompt))
        for p, c, r in items
    ]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def text_chunks(text: str, min_chars: int = 400) -> list[str]:
    """Cut a text into chunks of whole sentences, each at least `min_chars` long.

    Sentences (split after `.`, `!` or `?` followed by white space) are appended to the current
    chunk until it reaches `min_chars`; a shorter remainder at the end joins the last chunk, so
    every chunk has at least `min_chars` characters unless the whole text is shorter. This is
    how the ConceptVectors unlearning runs build forget and retain sets from a Wikipedia
    article (there with 400 characters); cap the token length with `text_examples`.
    """
    if min_chars < 1:
        raise ValueError(f"min_chars must be >= 1, got {min_chars}")
    chunks: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(text.strip()):
        current = f"{current} {sentence}" if current else sentence
        if len(current) >= min_chars:
            chunks.append(current)
            current = ""
    if current:
        if chunks:
            chunks[-1] = f"{chunks[-1]} {current}"
        else:
            chunks.append(current)
    return chunks


def text_examples(
    model: HookedTransformer,
    texts: Sequence[Text],
    max_tokens: int = 500,
    prepend_bos: bool | None = None,
) -> list[Example]:
    """Plain texts as examples with every token a target (language modelling on the text).

    Args:
        texts: strings (tokenised with the model's BOS convention) or token-id lists.
        max_tokens: longer texts keep their first `max_tokens` tokens.
        prepend_bos: for strings; default `model.cfg.default_prepend_bos`.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of texts, not one string; wrap it in a list")
    if not texts:
        raise ValueError("no texts given")
    limit = min(max_tokens, model.cfg.n_ctx)
    out = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            ids = tokenize(model, [text], prepend_bos=prepend_bos, max_tokens=10**9)[0][0]
        else:
            ids = _ids(model, text, "text")
        ids = ids[:limit]
        out.append(_check_example(Example(ids, [True] * len(ids)), f"text {i} ({str(text)[:40]!r})"))
    return out


def collate(examples: Sequence[Example], device: str | torch.device = "cpu") -> Batch:
    """Pad examples on the right into a `Batch` (pad id 0; masked out, see the module doc)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.tokens) for e in examples)
    tokens = torch.zeros((len(examples), width), dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.tokens)
        tokens[i, :n] = torch.tensor(e.tokens, dtype=torch.long)
        attention[i, :n] = 1
        loss[i, :n] = torch.tensor(e.loss_mask, dtype=torch.bool)
    loss[:, 0] = False
    return Batch(tokens, attention, loss).to(device)


def batch_indices(k: int, n: int, batch_size: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices of the examples in micro-batch `k` of an endless stream over `n` examples.

    The stream goes through the examples epoch by epoch, each epoch in its own seeded random
    order (or in order with `shuffle=False`), `batch_size` at a time; the last batch of an
    epoch may be smaller. A pure function of its arguments, so a resumed run gets the same
    batches without saving any iterator state.
    """
    if n < 1:
        raise ValueError("no examples to draw batches from")
    per_epoch = -(-n // batch_size)
    epoch, j = divmod(k, per_epoch)
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    return order[j * batch_size:(j + 1) * batch_size]
