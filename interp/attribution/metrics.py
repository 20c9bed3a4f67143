"""Metrics that localisation methods optimise, read from a few logit columns.

Exact patching runs thousands of patched forward passes; most of their cost past the patched
layer is the unembedding of every position into the whole vocabulary. A metric here declares
which vocabulary columns it reads at the last position (`columns`), so a method computes only
`ln_final(resid[:, -1]) @ W_U[:, columns]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer


@dataclass
class LogitDiff:
    """`logit[answer] - logit[wrong]` at the last position, optionally normalised.

    With `clean` and `corrupt` set (the mean logit differences of the clean and corrupt runs),
    the value is `(ld - corrupt) / (clean - corrupt)`: 1 on the clean run, 0 on the corrupt run
    (on average over prompts), as in the IOI patching literature.

    Attributes:
        answer_ids: `[batch]` the correct next token of each clean prompt.
        wrong_ids: `[batch]` the competing token.
        clean, corrupt: baselines for normalisation (None: no normalisation).
    """

    answer_ids: Int[Tensor, " batch"]
    wrong_ids: Int[Tensor, " batch"]
    clean: float | None = None
    corrupt: float | None = None

    @property
    def columns(self) -> Int[Tensor, "batch 2"]:
        return torch.stack([self.answer_ids, self.wrong_ids], dim=-1)

    def from_columns(self, cols: Float[Tensor, "rows 2"]) -> Float[Tensor, " rows"]:
        """The metric per row from the logits at `columns` (rows may repeat the batch)."""
        diff = cols[..., 0] - cols[..., 1]
        if self.clean is None or self.corrupt is None:
            return diff
        return (diff - self.corrupt) / (self.clean - self.corrupt)

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        """The metric per prompt from full logits."""
        cols = logits[:, -1].gather(-1, self.columns.to(logits.device))
        return self.from_columns(cols)

    def normalised(self, model: HookedTransformer, clean_tokens: Tensor,
                   corrupt_tokens: Tensor) -> "LogitDiff":
        """A copy normalised by this model's mean clean and corrupt logit differences."""
        raw = LogitDiff(self.answer_ids, self.wrong_ids)
        with torch.no_grad():
            clean = raw(model(clean_tokens)).mean().item()
            corrupt = raw(model(corrupt_tokens)).mean().item()
        if abs(clean - corrupt) < 1e-6:
            raise ValueError(
                f"clean and corrupt logit differences are equal ({clean:.4g}): the corruption "
                "does not change the metric, so it cannot be normalised"
            )
        return LogitDiff(self.answer_ids, self.wrong_ids, clean=clean, corrupt=corrupt)


def final_columns(
    model: HookedTransformer, resid: Float[Tensor, "rows d_model"], columns: Int[Tensor, "rows k"]
) -> Float[Tensor, "rows k"]:
    """Logits at `columns` from the final residual stream at the prediction position (before
    the final norm): `ln_final(resid) @ W_U[:, cols] + b_U[cols]`, soft-capped where the model
    caps its logits. The same numbers as the full logits gathered at `columns`, without the
    `[rows, d_vocab]` matmul.
    """
    x = resid[:, None, :]  # norms expect a position axis
    if hasattr(model, "ln_final"):  # models without normalisation have none
        x = model.ln_final(x)
    x = x[:, 0]
    columns = columns.to(x.device, torch.long)
    w = model.W_U.T[columns]  # rows k d_model
    logits = torch.einsum("rd,rkd->rk", x, w.to(x.dtype)) + model.b_U[columns].to(x.dtype)
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits
