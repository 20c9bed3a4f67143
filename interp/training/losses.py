"""Fine-tuning and unlearning losses, as functions of logits and a `Batch`.

All losses read next-token predictions at the *targets* of a batch: the logits at position
`t` predict token `t + 1`, which counts where `batch.loss_mask[:, t + 1]` is True. Log-softmax
is taken in float32 whatever the model's dtype, and only at target positions (the memory of
a `[n_targets, d_vocab]` slice instead of the whole `[batch, pos, d_vocab]`).

Two reductions appear, on purpose:

- **token mean** (`cross_entropy`): the mean negative log-likelihood over every target token
  of the batch, as Hugging Face's `labels=` loss computes it. SFT, gradient ascent (GA),
  gradient difference (GD) and the retain terms use it.
- **sequence log-probability** (`sequence_logprobs`): the *sum* of target log-probabilities of
  each sequence. NPO and DPO compare the policy and a frozen reference on whole responses, as
  in their papers (Zhang et al. 2024, arXiv 2404.05868, eq. 3: `log pi(y|x)` of the response;
  Rafailov et al. 2023) and in the ConceptVectors unlearning code (its per-sequence summed
  cross-entropy), so longer sequences weigh more in the log-ratio.

The losses (each documented below): `cross_entropy` (SFT), `gradient_ascent`,
`gradient_difference`, `npo`, `kl_to_reference` (token mean of KL(reference || model)),
`dpo`. `objective` combines them for the named objectives of `TrainConfig.loss`
(`OBJECTIVES`), running the model (and the frozen reference, without gradients).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.training.data import Batch

__all__ = [
    "OBJECTIVES",
    "ObjectiveValue",
    "check_reference",
    "cross_entropy",
    "dpo",
    "gradient_ascent",
    "gradient_difference",
    "kl_to_reference",
    "npo",
    "objective",
    "sequence_logprobs",
    "target_mask",
]

#: Named objectives and the data each reads: `data` (the main set: SFT examples, the forget
#: set, or preference pairs for DPO), `retain` (a retain set), `reference` (a frozen model).
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "sft": ("data",),
    "ga": ("data",),
    "gd": ("data", "retain"),
    "npo": ("data", "reference"),
    "npo_gd": ("data", "retain", "reference"),
    "npo_kl": ("data", "retain", "reference"),
    "dpo": ("data", "reference"),
}


def target_mask(batch: Batch) -> Bool[Tensor, "batch pos_minus_1"]:
    """Which next-token predictions count: entry `[b, t]` is True when the logits at position
    `t` predict a target (`loss_mask[b, t + 1]`, on a real token)."""
    return batch.loss_mask[:, 1:] & batch.attention_mask[:, 1:].bool()


def _target_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"], batch: Batch
) -> tuple[Float[Tensor, " n"], Tensor, Bool[Tensor, "batch pos_minus_1"]]:
    """Log-probabilities of the target tokens (float32), flattened, with their row index."""
    mask = target_mask(batch)
    picked = logits[:, :-1][mask].float()  # [n, d_vocab]
    targets = batch.tokens[:, 1:][mask]
    logp = picked.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return logp, rows, mask


def _check_logits(logits: Tensor, batch: Batch) -> None:
    if logits.ndim != 3 or logits.shape[:2] != batch.tokens.shape:
        raise ValueError(f"logits must be [batch, pos, d_vocab] matching the batch's tokens "
                         f"{tuple(batch.tokens.shape)}, got {tuple(logits.shape)}")


def sequence_logprobs(logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> Float[Tensor, " batch"]:
    """`log p(targets of row b)`: the sum of the target tokens' log-probabilities per row."""
    _check_logits(logits, batch)
    logp, rows, mask = _target_logprobs(logits, batch)
    return torch.zeros(mask.shape[0], device=logp.device).index_add(0, rows, logp)


def cross_entropy(logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> Float[Tensor, ""]:
    """Mean negative log-likelihood over all target tokens of the batch (the SFT loss).

    With the loss mask on response tokens only, this is supervised fine-tuning on the
    responses: prompts are context, never targets.
    """
    _check_logits(logits, batch)
    logp, _, _ = _target_logprobs(logits, batch)
    if logp.numel() == 0:
        raise ValueError("the batch has no target tokens (its loss mask is empty)")
    return -logp.mean()


def gradient_ascent(logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> Float[Tensor, ""]:
    """Gradient ascent on the forget set: `-cross_entropy`. Minimising it raises the loss of
    the forget data without bound; it destroys the model unless stopped early or balanced by
    a retain term."""
    return -cross_entropy(logits, batch)


def gradient_difference(
    forget_logits: Float[Tensor, "batch pos d_vocab"],
    forget: Batch,
    retain_logits: Float[Tensor, "batch2 pos2 d_vocab"],
    retain: Batch,
    retain_weight: float = 1.0,
) -> Float[Tensor, ""]:
    """Gradient difference: `-CE(forget) + retain_weight * CE(retain)`."""
    return -cross_entropy(forget_logits, forget) + retain_weight * cross_entropy(retain_logits, retain)


def npo(
    logp: Float[Tensor, " batch"], ref_logp: Float[Tensor, " batch"], beta: float = 0.1
) -> Float[Tensor, ""]:
    """Negative preference optimisation (Zhang et al. 2024):
    `-(2 / beta) * mean_b log sigmoid(-beta * (logp_b - ref_logp_b))`.

    `logp` and `ref_logp` are *sequence* log-probabilities (`sequence_logprobs`) of each forget
    sequence under the model and under the frozen reference. At the reference (`logp =
    ref_logp`) the loss is `(2 / beta) log 2` and its gradient is that of gradient ascent on the
    summed log-likelihood; as the model's probability of the forget data falls below the
    reference's the gradient fades, which is why NPO collapses far more slowly than GA.
    `2 / beta` makes the loss tend to GA as `beta -> 0`.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp.to(logp))).mean()


def kl_to_reference(
    logits: Float[Tensor, "batch pos d_vocab"],
    ref_logits: Float[Tensor, "batch pos d_vocab"],
    batch: Batch,
) -> Float[Tensor, ""]:
    """Mean over target positions of `KL(reference || model)` between next-token distributions.

    The retain term of NPO+KL: it keeps the model's whole next-token distribution on retain
    data close to the reference's, not only the probability of the observed token. The
    ConceptVectors code takes the same direction (`kl_div(model, reference)`) but averages
    over every position of the padded batch; here pads and non-targets are excluded.
    """
    _check_logits(logits, batch)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} and logits {tuple(logits.shape)} differ")
    mask = target_mask(batch)
    if not bool(mask.any()):
        raise ValueError("the batch has no target tokens (its loss mask is empty)")
    logq = logits[:, :-1][mask].float().log_softmax(-1)
    logr = ref_logits[:, :-1][mask].float().to(logq.device).log_softmax(-1)
    return (logr.exp() * (logr - logq)).sum(-1).mean()


def dpo(
    chosen_logp: Float[Tensor, " batch"],
    rejected_logp: Float[Tensor, " batch"],
    ref_chosen_logp: Float[Tensor, " batch"],
    ref_rejected_logp: Float[Tensor, " batch"],
    beta: float = 0.1,
) -> Float[Tensor, ""]:
    """Direct preference optimisation (Rafailov et al. 2023):
    `-mean log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))`.

    Arguments are sequence log-probabilities of the responses. `beta` (default 0.1, the paper's
    common choice) is the strength of the implicit KL constraint to the reference: smaller
    beta lets the model move further. This is the paper's form; the ConceptVectors unlearning
    code multiplies it by `2 / beta` (as for NPO), which only rescales the learning rate.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = (chosen_logp - ref_chosen_logp.to(chosen_logp)) - (rejected_logp - ref_rejected_logp.to(chosen_logp))
    return -F.logsigmoid(beta * margin).mean()


# --------------------------------------------------------------------------------------------
# Named objectives on a model
# --------------------------------------------------------------------------------------------


class ObjectiveValue(NamedTuple):
    """A loss to minimise and its parts (floats, for logging)."""

    loss: Float[Tensor, ""]
    parts: dict[str, float]


def check_reference(model: HookedTransformer, reference: HookedTransformer) -> None:
    """Refuse a reference model that cannot be compared token by token with `model`."""
    if reference.cfg.d_vocab != model.cfg.d_vocab:
        raise ValueError(
            f"the reference model has a vocabulary of {reference.cfg.d_vocab} tokens but the "
            f"model has {model.cfg.d_vocab}: log-probabilities of the same token ids are not "
            "comparable; use a frozen copy of the model being trained (the default) as reference"
        )


def _logits(model: HookedTransformer, batch: Batch) -> Float[Tensor, "batch pos d_vocab"]:
    return model(batch.tokens, attention_mask=batch.attention_mask)


def objective(
    name: str,
    model: HookedTransformer,
    batches: Mapping[str, Batch],
    reference: HookedTransformer | None = None,
    beta: float = 0.1,
    retain_weight: float = 1.0,
) -> ObjectiveValue:
    """The named objective on one micro-batch.

    Args:
        name: one of `OBJECTIVES`:
            `sft` cross-entropy on the targets; `ga` gradient ascent on the forget set;
            `gd` `-CE(forget) + retain_weight * CE(retain)`; `npo` NPO against the reference;
            `npo_gd` `NPO + retain_weight * CE(retain)`; `npo_kl`
            `NPO + retain_weight * KL(reference || model)` on the retain set; `dpo` DPO.
        batches: `data` (for `dpo`: `chosen` and `rejected`), and `retain` where needed.
        reference: the frozen reference (run under `torch.no_grad`).
        beta: NPO / DPO inverse temperature.
        retain_weight: weight of the retain term.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(OBJECTIVES)}")
    needs = OBJECTIVES[name]
    if "reference" in needs:
        if reference is None:
            raise ValueError(f"the {name!r} loss needs a frozen reference model")
        check_reference(model, reference)

    def ref_logprobs(batch: Batch) -> Tensor:
        with torch.no_grad():
            return sequence_logprobs(_logits(reference, batch.to(reference.cfg.device)), batch.to(reference.cfg.device))

    parts: dict[str, float] = {}
    if name == "dpo":
        chosen, rejected = batches["chosen"], batches["rejected"]
        lc = sequence_logprobs(_logits(model, chosen), chosen)
        lr = sequence_logprobs(_logits(model, rejected), rejected)
        loss = dpo(lc, lr, ref_logprobs(chosen), ref_logprobs(rejected), beta=beta)
        parts["margin"] = float((lc - lr).detach().mean())
        return ObjectiveValue(loss, parts)
    data = batches["data"]
    logits = _logits(model, data)
    if name == "sft":
        loss = cross_entropy(logits, data)
    elif name in ("ga", "gd"):
        ce = cross_entropy(logits, data)
        parts["forget_ce"] = float(ce.detach())
        loss = -ce
    else:
        lp = sequence_logprobs(logits, data)
        loss = npo(lp, ref_logprobs(data), beta=beta)
        parts["npo"] = float(loss.detach())
    if "retain" in needs:
        retain = batches["retain"]
        retain_logits = _logits(model, retain)
        if name == "npo_kl":
            with torch.no_grad():
                ref_retain = _logits(reference, retain.to(reference.cfg.device))
            term = kl_to_reference(retain_logits, ref_retain, retain)
            parts["retain_kl"] = float(term.detach())
        else:
            term = cross_entropy(retain_logits, retain)
            parts["retain_ce"] = float(term.detach())
        loss = loss + retain_weight * term
    return ObjectiveValue(loss, parts)
