"""Metrics that localisation methods optimise, read from a few logit columns.

Exact patching runs thousands of patched forward passes; most of their cost past the patched
layer is the unembedding of every position into the whole vocabulary. A metric here declares
which vocabulary columns it reads (`columns`) and where (`end_pos`, each prompt's prediction
position), so a method computes only `ln_final(resid[end_pos]) @ W_U[:, columns]`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer


@dataclass
class LogitDiff:
    """`logit[answer] - logit[wrong]` at each prompt's prediction position, optionally normalised.

    With `clean` and `corrupt` set (the mean logit differences of the clean and corrupt runs),
    the value is `(ld - corrupt) / (clean - corrupt)`: 1 on the clean run, 0 on the corrupt run
    (on average over prompts), as in the IOI patching literature.

    Prompts of different lengths are right-padded to one batch and `end_pos` says where each
    prompt's prediction is read. With causal attention the padding after a prompt's end cannot
    change anything at or before it, so every method (exact patching, AtP, IG, RelP) gives the
    same numbers as it would on the prompts one by one.

    Attributes:
        answer_ids: `[batch]` the correct next token of each clean prompt.
        wrong_ids: `[batch]` the competing token.
        clean, corrupt: baselines for normalisation (None: no normalisation).
        end_pos: `[batch]` the position whose logits are read (None: the last position).
    """

    answer_ids: Int[Tensor, " batch"]
    wrong_ids: Int[Tensor, " batch"]
    clean: float | None = None
    corrupt: float | None = None
    end_pos: Int[Tensor, " batch"] | None = None

    def __post_init__(self) -> None:
        if self.answer_ids.shape != self.wrong_ids.shape or self.answer_ids.ndim != 1:
            raise ValueError(
                f"answer_ids {tuple(self.answer_ids.shape)} and wrong_ids "
                f"{tuple(self.wrong_ids.shape)} must be 1-D with one token per prompt"
            )
        if self.end_pos is not None and self.end_pos.shape != self.answer_ids.shape:
            raise ValueError(
                f"end_pos {tuple(self.end_pos.shape)} must have one position per prompt "
                f"({self.answer_ids.shape[0]})"
            )

    def __len__(self) -> int:
        return self.answer_ids.shape[0]

    @property
    def columns(self) -> Int[Tensor, "batch 2"]:
        return torch.stack([self.answer_ids, self.wrong_ids], dim=-1)

    def positions(self, n_pos: int) -> Int[Tensor, " batch"]:
        """Each prompt's prediction position in a batch of `n_pos` positions."""
        if self.end_pos is None:
            return torch.full((len(self),), n_pos - 1, dtype=torch.long)
        if int(self.end_pos.max()) >= n_pos or int(self.end_pos.min()) < 0:
            raise ValueError(
                f"end_pos ranges over {int(self.end_pos.min())}..{int(self.end_pos.max())} but "
                f"the tokens have {n_pos} positions"
            )
        return self.end_pos.long().cpu()

    def at_end(self, x: Float[Tensor, "batch pos *rest"]) -> Float[Tensor, " batch *rest"]:
        """`x` read at each prompt's prediction position (`x` has one row per prompt, or a
        whole number of copies of the batch stacked as `(copies batch)`)."""
        pos = self.positions(x.shape[1]).to(x.device)
        pos = pos.repeat(x.shape[0] // len(pos))
        return x[torch.arange(x.shape[0], device=x.device), pos]

    def from_columns(self, cols: Float[Tensor, "rows 2"]) -> Float[Tensor, " rows"]:
        """The metric per row from the logits at `columns` (rows may repeat the batch)."""
        diff = cols[..., 0] - cols[..., 1]
        if self.clean is None or self.corrupt is None:
            return diff
        return (diff - self.corrupt) / (self.clean - self.corrupt)

    def __call__(
        self, logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch vocab"]
    ) -> Float[Tensor, " batch"]:
        """The metric per prompt (differentiable) from full logits, or from logits already
        taken at each prompt's prediction position (2-D)."""
        at_end = logits if logits.ndim == 2 else self.at_end(logits)
        cols = at_end.gather(-1, self.columns.to(logits.device))
        return self.from_columns(cols)

    def from_final_resid(
        self, model: HookedTransformer, resid: Float[Tensor, "batch d_model"]
    ) -> Float[Tensor, " batch"]:
        """The metric from the final residual stream (before `ln_final`) at each prompt's
        prediction position, computing only the two needed logits (`final_columns`)."""
        return self.from_columns(final_columns(model, resid, self.columns))

    def on_model(self, model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
        """The metric of `model` run on `tokens` (differentiable), computing only the logits it
        reads: the forward pass stops at the final residual stream, then `ln_final` and the
        needed unembedding columns at each prediction position. The same numbers as
        `self(model(tokens))` without the `[batch, pos, d_vocab]` logits (1 GB for a batch of
        50 prompts on Gemma's 262k vocabulary)."""
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        return self.from_final_resid(model, self.at_end(resid))

    def select(self, rows: slice | Sequence[int] | Tensor) -> "LogitDiff":
        """The metric for a subset of the prompts, on the whole batch's normalisation scale."""
        index = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows)
        index = index.long().reshape(-1)
        return replace(
            self,
            answer_ids=self.answer_ids[index.to(self.answer_ids.device)],
            wrong_ids=self.wrong_ids[index.to(self.wrong_ids.device)],
            end_pos=None if self.end_pos is None else self.end_pos[index.to(self.end_pos.device)],
        )

    def normalised(self, model: HookedTransformer, clean_tokens: Tensor,
                   corrupt_tokens: Tensor, batch_size: int = 64) -> "LogitDiff":
        """A copy normalised by this model's mean clean and corrupt logit differences
        (run in batches of `batch_size`, up to the final residual stream only)."""
        raw = replace(self, clean=None, corrupt=None)
        means = []
        with torch.no_grad():
            for tokens in (clean_tokens, corrupt_tokens):
                values = []
                for lo in range(0, tokens.shape[0], batch_size):
                    part = raw.select(slice(lo, lo + batch_size))
                    resid = model(tokens[lo:lo + batch_size].to(model.cfg.device),
                                  stop_at_layer=model.cfg.n_layers)
                    values.append(part.from_final_resid(model, part.at_end(resid)))
                means.append(torch.cat(values).float().mean().item())
        clean, corrupt = means
        if abs(clean - corrupt) < 1e-6:
            raise ValueError(
                f"clean and corrupt logit differences are equal ({clean:.4g}): the corruption "
                "does not change the metric, so it cannot be normalised"
            )
        return replace(self, clean=clean, corrupt=corrupt)

    def to(self, device: str | torch.device) -> "LogitDiff":
        return replace(self, answer_ids=self.answer_ids.to(device), wrong_ids=self.wrong_ids.to(device),
                       end_pos=None if self.end_pos is None else self.end_pos.to(device))


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
