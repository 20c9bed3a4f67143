"""Token contexts from the shared text corpus, split into training and held-out text.

The corpus is `corpus/*.txt` under `interp.data.data_dir()` (about 1M SmolLM2 tokens; see the
data README): Tiny Shakespeare, the WikiText-2 validation and test splits and an OpenWebText
sample. SAEs train on `TRAIN_FILES` and are evaluated on `HELDOUT_FILES` (WikiText-2 test: the
same kind of text as a training file, never seen in training).

Each split's files are tokenised separately (no BOS; files joined with a blank line), concatenated
into one token stream and cut into non-overlapping windows of `context_size` tokens. When the
model expects a BOS token (`model.cfg.default_prepend_bos`, e.g. Gemma) each window is BOS plus
`context_size - 1` text tokens; SmolLM2 gets plain windows, so its first position is an ordinary
token that acts as an attention sink (its residual norm is ~100x the others at mid depth: SAE
training and statistics skip it, see `interp.saes.train`). Windows are shuffled with a seed
before a subset is taken, so a small sample still mixes all files.

Models without a tokenizer (the tiny test models, `d_vocab` 256) get UTF-8 bytes as tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import einops
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.data import data_file

__all__ = ["TRAIN_FILES", "HELDOUT_FILES", "corpus_contexts", "corpus_tokens", "split_contexts"]

TRAIN_FILES = ("tinyshakespeare.txt", "wikitext2_valid.txt", "openwebtext_sample.txt")
HELDOUT_FILES = ("wikitext2_test.txt",)


def corpus_tokens(
    model: HookedTransformer,
    split: Literal["train", "heldout"] = "train",
    files: Sequence[str] | None = None,
) -> Int[Tensor, " n_tokens"]:
    """The token stream of a corpus split (or of `files` under `corpus/`), without BOS tokens."""
    names = tuple(files) if files is not None else _split_files(split)
    texts = [data_file(f"corpus/{name}").read_text(encoding="utf-8") for name in names]
    return torch.cat([_encode(model, text if i == 0 else "\n\n" + text) for i, text in enumerate(texts)])


def split_contexts(
    stream: Int[Tensor, " n_tokens"],
    context_size: int,
    bos_token_id: int | None = None,
) -> Int[Tensor, "n_contexts context_size"]:
    """Cut a token stream into non-overlapping windows of `context_size` tokens (the last partial
    window is dropped); with `bos_token_id` each window is BOS plus `context_size - 1` tokens."""
    body = context_size - (1 if bos_token_id is not None else 0)
    if body < 1:
        raise ValueError(f"context_size={context_size} leaves no room for text tokens.")
    n = stream.numel() // body
    if n == 0:
        raise ValueError(f"The stream has {stream.numel()} tokens, fewer than one context of {body}.")
    windows = einops.rearrange(stream[: n * body], "(n ctx) -> n ctx", ctx=body)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)
    return windows


def corpus_contexts(
    model: HookedTransformer,
    split: Literal["train", "heldout"] = "train",
    context_size: int = 128,
    n_tokens: int | None = None,
    seed: int = 0,
    files: Sequence[str] | None = None,
) -> Int[Tensor, "n_contexts context_size"]:
    """Shuffled windows of a corpus split for `model` (see the module docstring).

    Args:
        model: gives the tokenizer and whether a BOS token starts each window.
        split: "train" or "heldout" (ignored when `files` is given).
        context_size: tokens per window, BOS included.
        n_tokens: keep `ceil(n_tokens / context_size)` windows (default: all of them).
        seed: shuffles the windows.
        files: file names under `corpus/` instead of a split.

    Raises:
        ValueError: `n_tokens` asks for more windows than the split has.
    """
    bos = model.tokenizer.bos_token_id if (model.cfg.default_prepend_bos and model.tokenizer) else None
    contexts = split_contexts(corpus_tokens(model, split, files), context_size, bos)
    order = torch.randperm(contexts.shape[0], generator=torch.Generator().manual_seed(seed))
    contexts = contexts[order]
    if n_tokens is not None:
        n = -(-int(n_tokens) // context_size)
        if n > contexts.shape[0]:
            raise ValueError(
                f"n_tokens={n_tokens} needs {n} contexts of {context_size} tokens but the "
                f"{split} split has only {contexts.shape[0]} ({contexts.numel()} tokens)."
            )
        contexts = contexts[:n]
    return contexts


def _split_files(split: str) -> tuple[str, ...]:
    if split == "train":
        return TRAIN_FILES
    if split == "heldout":
        return HELDOUT_FILES
    raise ValueError(f"Unknown corpus split {split!r}; use 'train' or 'heldout'.")


def _encode(model: HookedTransformer, text: str) -> Int[Tensor, " n"]:
    if model.tokenizer is None:
        if model.cfg.d_vocab < 256:
            raise ValueError(f"{model.cfg.model_name} has no tokenizer and d_vocab "
                             f"{model.cfg.d_vocab} < 256, so bytes cannot serve as tokens.")
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
