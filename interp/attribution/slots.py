"""Position sites by named slot: IO, S1, S2, end (and `other`) instead of raw token indices.

A batch of prompt pairs built from one template has every slot at the same token position in
every prompt, so a position index means one slot throughout and the raw per-position scores
read directly. A batch that mixes templates (or lengths) does not: position 5 may be the
subject in one prompt and a place name in another, and a score *summed over the batch* at
position 5 mixes the two. Such scores cannot be split into slots afterwards; slot scores need
each prompt's own position scores (or scores of groups of prompts that share their slot
positions, which is the same thing for methods whose batch score is the mean of per-prompt
scores).

`by_slot(scores, pairs)` maps position scores to slots, per prompt: a slot's value is the score
at that prompt's slot position, `other` collects the prompt's remaining real positions (padding
after its end is left out), then the mean over prompts is taken. Summed over slots (with
`other="sum"`) a prompt's slot scores are its position scores summed, so the totals agree with
the raw scores. A slot a template lacks (position -1) scores 0 for that prompt (patching
nothing changes nothing); two slots at one position both get its value.

Where the scores come from:

- one template (one position per slot for the whole batch): any method's scores;
- per-prompt scores, with a `prompt` axis (`attribution_patching(..., per_prompt=True)`);
- otherwise `interp.attribution.attribute(model, pairs, ..., slots=True)`, which runs each group
  of prompts that share their slot positions (`position_groups`) on its own and combines the
  groups' slot scores, weighted by their number of prompts. For every method whose batch score
  is the mean of per-prompt scores (exact patching, AtP, AtP*, IG, RelP) this equals slot
  scores computed prompt by prompt; GradDrop's magnitudes are not such a mean.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Mapping, Union

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.attribution.sites import Scores
from interp.tasks.ioi import PromptPairs

OTHER = "other"

ScoresLike = Union[Scores, Mapping[str, Scores]]


def slot_positions(pairs: PromptPairs) -> tuple[list[str], Int[Tensor, "batch slot"]]:
    """The slot names (in `pairs.positions` order, `end` added from `end_pos` where missing)
    and each prompt's position of each slot (-1 where its template has none)."""
    names = [name for name in pairs.positions if name != OTHER]
    columns = [pairs.positions[name].cpu().long() for name in names]
    if "end" not in pairs.positions:
        names.append("end")
        columns.append(pairs.end_pos.cpu().long())
    return names, torch.stack(columns, dim=1)


def position_groups(pairs: PromptPairs) -> list[Int[Tensor, " rows"]]:
    """Row indices of each group of prompts that share every slot position and their length
    (within a group a position index means one slot), in order of first appearance."""
    _, where = slot_positions(pairs)
    key = torch.cat([where, pairs.end_pos.cpu().long()[:, None]], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    firsts = {}
    for row, g in enumerate(inverse.tolist()):
        firsts.setdefault(g, []).append(row)
    return [torch.tensor(rows) for rows in firsts.values()]


def slot_weights(
    pairs: PromptPairs, n_pos: int, other: Literal["sum", "mean"] = "sum"
) -> tuple[list[str], Float[Tensor, "batch pos slot"]]:
    """Per prompt, the weight of each position in each slot: 1 at the slot's position; for
    `other`, 1 (or 1/count for `"mean"`) at each real position in no slot, 0 on padding."""
    names, where = slot_positions(pairs)
    batch = where.shape[0]
    if int(pairs.end_pos.max()) >= n_pos:
        raise ValueError(f"the scores have {n_pos} positions but the pairs reach position "
                         f"{int(pairs.end_pos.max())}: give the pairs the scores were computed on")
    weights = torch.zeros(batch, n_pos, len(names) + 1)
    rows = torch.arange(batch)
    for s in range(len(names)):
        present = where[:, s] >= 0
        weights[rows[present], where[present, s], s] = 1.0
    real = torch.arange(n_pos)[None, :] <= pairs.end_pos.cpu()[:, None]
    rest = real & (weights[..., :-1].sum(-1) == 0)
    weights[..., -1] = rest.float()
    if other == "mean":
        weights[..., -1] /= rest.sum(-1, keepdim=True).clamp(min=1)
    return [*names, OTHER], weights


def by_slot(
    scores: ScoresLike,
    pairs: PromptPairs,
    other: Literal["sum", "mean"] = "sum",
    keep_prompts: bool = False,
) -> ScoresLike:
    """Position scores by named slot (see the module notes); a dict of families maps each.

    Args:
        scores: a family's `Scores` (or a dict of them); families without a `pos` axis are
            returned unchanged. With a `prompt` axis (per-prompt scores) any batch works;
            without one the batch must have one position per slot (`position_groups` one group).
        pairs: the prompt pairs the scores were computed on (same prompts, same order).
        other: how the positions in no slot combine: `"sum"` (their total effect, so slot
            scores add up to the position scores) or `"mean"` (per position).
        keep_prompts: with per-prompt scores, keep the `prompt` axis (each prompt's slot
            scores) instead of taking the mean over prompts.

    Returns:
        The same kind as `scores`, the `pos` axis replaced by `slot` (labels: the slot names
        and `other`).

    Raises:
        ValueError: scores summed over a batch whose prompts put the slots at different
            positions, or scores and pairs of different batch sizes or lengths.
    """
    if other not in ("sum", "mean"):
        raise ValueError(f"other must be 'sum' or 'mean', got {other!r}")
    if isinstance(scores, Scores):
        return _by_slot(scores, pairs, other, keep_prompts)
    return {name: _by_slot(s, pairs, other, keep_prompts) for name, s in scores.items()}


def _by_slot(scores: Scores, pairs: PromptPairs, other: str, keep_prompts: bool) -> Scores:
    if "pos" not in scores.dims:
        return scores
    pos = scores.dims.index("pos")
    names, weights = slot_weights(pairs, scores.values.shape[pos], other)
    values = scores.values.float()
    dims = list(scores.dims)
    if "prompt" in scores.dims:
        prompt = dims.index("prompt")
        if values.shape[prompt] != len(pairs):
            raise ValueError(f"the scores have {values.shape[prompt]} prompts but the pairs "
                             f"{len(pairs)}: give the pairs the scores were computed on")
        # prompt and pos last, then each prompt's positions weighted into its slots
        moved = values.movedim((prompt, pos), (-2, -1))
        slotted = torch.einsum("...bp,bps->...bs", moved, weights.to(values.device))
        if keep_prompts:
            out = slotted.movedim((-2, -1), (prompt, pos))
            out_dims = tuple("slot" if d == "pos" else d for d in dims)
        else:
            out = slotted.mean(-2).movedim(-1, pos - (prompt < pos))
            out_dims = tuple("slot" if d == "pos" else d for d in dims if d != "prompt")
    else:
        groups = position_groups(pairs)
        if len(groups) > 1:
            raise ValueError(
                f"these {scores.family} scores are summed over the batch, and its prompts put "
                f"the slots at {len(groups)} different sets of positions (mixed templates or "
                "lengths): a position index means different slots in different prompts, so "
                "the sum cannot be split into slots. Get per-prompt scores "
                "(attribution_patching(..., per_prompt=True)), or call "
                "interp.attribution.attribute(model, pairs, ..., slots=True), which runs each "
                "group of prompts that share their slot positions on its own"
            )
        if keep_prompts:
            raise ValueError("keep_prompts needs per-prompt scores (with a 'prompt' axis)")
        w = weights[0].to(values.device)  # every prompt has the same weights
        moved = values.movedim(pos, -1)
        out = einops.einsum(moved, w, "... p, p s -> ... s").movedim(-1, pos)
        out_dims = tuple("slot" if d == "pos" else d for d in dims)
    labels = {k: v for k, v in scores.labels.items() if k not in ("pos", "prompt") or
              (k == "prompt" and keep_prompts)}
    labels["slot"] = names
    numbers = {k: v for k, v in scores.numbers.items() if k not in ("pos", "prompt") or
               (k == "prompt" and keep_prompts)}
    return replace(scores, values=out.contiguous(), dims=out_dims, labels=labels, numbers=numbers)
