"""Token helpers with errors that say what was wrong."""

from __future__ import annotations

from transformer_lens import HookedTransformer


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
