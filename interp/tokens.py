"""Token helpers with errors that say what was wrong: single tokens, and texts as token ids
(`tokenize`, the one tokenisation that collection, generation and training share)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Union

from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

#: Strings, token-id lists, or a 2-D int tensor of token ids.
Texts = Union[Sequence[str], Sequence[Sequence[int]], Int[Tensor, "n pos"]]


def single_token(model: HookedTransformer, text: str, what: str = "answer") -> int:
    """The id of `text` if it is exactly one token of `model`'s tokenizer (no BOS added).

    Raises:
        ValueError: naming `text`, what it was for, and the tokens it splits into.
    """
    if model.tokenizer is None:
        raise ValueError(f"{model.cfg.model_name} has no tokenizer; pass token ids instead of {text!r}.")
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise ValueError(
            f"The {what} {text!r} is not a single token for {model.cfg.model_name}: it tokenises "
            f"to {len(ids)} tokens {pieces}. Choose a {what} that is one token (mind the leading "
            f"space, e.g. ' Mary')."
        )
    return ids[0]


def tokenize(
    model: HookedTransformer,
    texts: Texts,
    chat_template: bool = False,
    system_prompt: str | None = None,
    prepend_bos: bool | None = None,
    max_tokens: int | None = None,
) -> tuple[list[list[int]], int]:
    """Token ids of each text, as `collect` feeds them to the model.

    Args:
        model: the model (its tokenizer and `cfg.default_prepend_bos`, `cfg.n_ctx`).
        texts: strings, or already tokenised texts (lists of ids or a 2-D int tensor, used
            as they are: no BOS, no template).
        chat_template: wrap each string as a user turn with the tokenizer's chat template.
        system_prompt: a system message before each user turn (needs `chat_template`).
        prepend_bos: add the BOS token before plain strings; None uses the model's default.
        max_tokens: longer texts keep their first token if it is BOS, then their last tokens
            (left truncation, so the end of the text, which the last token summarises, stays);
            default `model.cfg.n_ctx`.

    Returns:
        `(token_ids, n_truncated)`.

    Raises:
        ValueError: strings for a model without a tokenizer; a chat template asked of a
            tokenizer without one, or of pre-tokenised input; an empty text.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of texts, not one string; wrap it in a list")
    if isinstance(texts, Tensor):
        if texts.ndim != 2 or texts.dtype.is_floating_point:
            raise ValueError(f"a tensor of texts must be 2-D token ids, got {tuple(texts.shape)} {texts.dtype}")
        texts = texts.tolist()
    items = list(texts)
    if not items:
        raise ValueError("no texts given")
    if system_prompt is not None and not chat_template:
        raise ValueError("system_prompt needs chat_template=True")
    tok = model.tokenizer
    as_strings = all(isinstance(t, str) for t in items)
    if not as_strings:
        if any(isinstance(t, str) for t in items):
            raise TypeError("texts mixes strings and token ids; pass one kind")
        if chat_template:
            raise ValueError("chat_template=True needs strings, but the texts are token ids")
        ids = [[int(i) for i in t] for t in items]
    else:
        if tok is None:
            raise ValueError(
                f"{model.cfg.model_name} has no tokenizer, so it cannot read strings; pass token "
                "ids (lists of ints or a 2-D int tensor) instead"
            )
        if chat_template:
            if not getattr(tok, "chat_template", None):
                raise ValueError(
                    f"the tokenizer of {model.cfg.model_name} has no chat template; use "
                    "chat_template=False (a base model) or a chat model such as smollm2-135m-instruct"
                )
            prefix = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
            strings = [tok.apply_chat_template(prefix + [{"role": "user", "content": t}],
                                               tokenize=False, add_generation_prompt=True)
                       for t in items]
            ids = [list(x) for x in tok(strings, add_special_tokens=False)["input_ids"]]
        else:
            bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
            ids = [list(x) for x in tok(items, add_special_tokens=False)["input_ids"]]
            if bos:
                if tok.bos_token_id is None:
                    raise ValueError(f"prepend_bos=True but the tokenizer of {model.cfg.model_name} has no BOS token")
                ids = [[tok.bos_token_id] + x for x in ids]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"text {i} ({str(items[i])[:40]!r}) has no tokens; remove empty texts")
    limit = max_tokens or model.cfg.n_ctx
    bos_id = getattr(tok, "bos_token_id", None) if tok is not None else None
    n_truncated = 0
    for i, x in enumerate(ids):
        if len(x) > limit:
            keep_first = bos_id is not None and x[0] == bos_id
            ids[i] = ([x[0]] + x[len(x) - limit + 1:]) if keep_first else x[len(x) - limit:]
            n_truncated += 1
    if n_truncated:
        warnings.warn(f"{n_truncated} text(s) longer than {limit} tokens were truncated from the left")
    return ids, n_truncated
