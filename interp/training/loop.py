"""The fine-tuning loop: `train(model, config, data, ...)`.

One optimiser step accumulates the gradients of `grad_accum` micro-batches of `batch_size`
examples (each micro-batch's loss divided by `grad_accum`), masks the gradients of partial
scopes, clips the gradient norm, steps AdamW (or SGD), restores masked-out entries and steps
the learning-rate schedule (linear warm-up, then constant or cosine decay).

**Determinism and resuming.** The k-th micro-batch is a pure function of `(k, seed)`
(`interp.training.data.batch_indices`; the retain set has its own stream, seeded `seed + 1`),
and nothing else in a step is random. A checkpoint (every `checkpoint_every` steps) holds the
trainable parameters (the adapters for LoRA), the optimiser and scheduler states, the RNG
states, the step and the loss history. `train(..., resume=True)` on a model in its *starting*
state (loaded and edited as for the first run, e.g. the same noise on the Needle vector)
loads the latest checkpoint and continues, so an interrupted run ends with the same weights
as an uninterrupted one (bit for bit on the same device; `tests/test_training.py` checks it).
A checkpoint written under a different training configuration is refused.

**The reference model** of NPO / DPO defaults to a frozen copy of `model` taken before
training starts (before a checkpoint is loaded, which is why resuming needs the starting
model). Pass `reference=` to use another model; it must share the vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from interp.training.data import Batch, Example, PreferencePair, batch_indices, collate
from interp.training.losses import OBJECTIVES, check_reference, objective
from interp.training.scopes import AppliedScope, Full, Scope

__all__ = ["StepInfo", "TrainConfig", "TrainingResult", "lr_factor", "train"]


@dataclass
class TrainConfig:
    """Settings of one fine-tuning run (everything but the data, the scope and the models)."""

    loss: str = "sft"
    """Objective: `sft`, `ga`, `gd`, `npo`, `npo_gd`, `npo_kl` or `dpo` (see
    `interp.training.losses.objective`)."""

    lr: float = 1e-5
    """Peak learning rate (reached after the warm-up)."""

    max_steps: int | None = None
    """Optimiser steps; None: `epochs` passes over the main data set."""

    epochs: float = 1.0
    """Passes over the main data set when `max_steps` is None."""

    batch_size: int = 4
    """Examples per micro-batch (pairs for DPO)."""

    grad_accum: int = 1
    """Micro-batches per optimiser step (the effective batch is `batch_size * grad_accum`)."""

    warmup_steps: int = 0
    """Linear warm-up: step s (from 0) uses `lr * (s + 1) / warmup_steps` while s < warmup."""

    schedule: Literal["constant", "cosine"] = "constant"
    """After the warm-up: constant, or cosine decay to `min_lr_ratio * lr` at the last step."""

    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule, as a fraction of `lr`."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    """`adamw` (torch.optim.AdamW) or plain `sgd` (no momentum)."""

    weight_decay: float = 0.0
    """AdamW's decoupled weight decay (masked-out entries are protected, see scopes)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment coefficients."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of the trainable parameters to this; None: no clipping."""

    beta: float = 0.1
    """NPO / DPO inverse temperature."""

    retain_weight: float = 1.0
    """Weight of the retain term of `gd`, `npo_gd` and `npo_kl`."""

    seed: int = 0
    """Seeds the data order (and torch's global RNG at the start of a fresh run)."""

    shuffle: bool = True
    """Shuffle the examples every epoch (seeded); False: in order."""

    checkpoint_dir: str | None = None
    """Directory for checkpoints (`step-0000010.pt`, ...); None: no checkpoints."""

    checkpoint_every: int = 0
    """Write a checkpoint every this many optimiser steps (0: never; the last step always
    writes one when `checkpoint_dir` is set)."""

    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""

    progress: bool = True
    """Show a tqdm progress bar with the loss."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(sorted(unknown))}")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


#: Fields that do not change what a run computes (a resumed run may differ in them).
_RUN_ONLY_FIELDS = ("checkpoint_dir", "checkpoint_every", "keep_checkpoints", "progress")


class StepInfo(NamedTuple):
    """What a callback sees after each optimiser step.

    Attributes:
        step: optimiser steps done (1 after the first).
        loss: the step's loss (mean over its micro-batches).
        parts: the loss's named parts (means over the micro-batches).
        lr: the learning rate the step used.
        grad_norm: the gradient norm before clipping.
        model: the model being trained.
    """

    step: int
    loss: float
    parts: dict[str, float]
    lr: float
    grad_norm: float
    model: HookedTransformer


@dataclass
class TrainingResult:
    """The outcome of `train`.

    Attributes:
        losses: loss per optimiser step, from step 1 (steps before a resume included).
        parts: `{part name: value per step}` (e.g. `forget_ce`, `retain_ce`, `npo`).
        lrs: learning rate per step.
        grad_norms: gradient norm per step, before clipping.
        steps: optimiser steps done in total.
        total_steps: the planned number of steps.
        resumed_from: the checkpoint step this call started from (0 for a fresh run).
        stopped_early: a callback asked to stop before `total_steps`.
        seconds: wall-clock time of this call.
        seconds_per_step: mean time per step in this call.
        tokens: target tokens seen in this call.
        trainable: names of the optimised parameters.
        n_trainable: trainable entries (masked scopes count their mask only).
        checkpoint: the last checkpoint written, if any.
        config: the configuration, as a dict.
    """

    losses: list[float]
    parts: dict[str, list[float]]
    lrs: list[float]
    grad_norms: list[float]
    steps: int
    total_steps: int
    resumed_from: int
    stopped_early: bool
    seconds: float
    seconds_per_step: float
    tokens: int
    trainable: list[str]
    n_trainable: int
    checkpoint: str | None
    config: dict[str, Any] = field(default_factory=dict)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier of optimiser step `step` (from 0) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; use 'constant' or 'cosine'")


def _check_config(config: TrainConfig) -> None:
    if config.loss not in OBJECTIVES:
        raise ValueError(f"unknown loss {config.loss!r}; choose one of {', '.join(OBJECTIVES)}")
    for name in ("batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 (or None), got {config.max_steps}")
    if config.max_steps is None and config.epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {config.epochs}")
    if config.schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule {config.schedule!r}; use 'constant' or 'cosine'")
    if config.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'adamw' or 'sgd'")
    if config.checkpoint_every and not config.checkpoint_dir:
        raise ValueError("checkpoint_every is set but checkpoint_dir is not")


def _set_name(loss: str) -> str:
    return {"sft": "training set", "dpo": "set of preference pairs"}.get(loss, "forget set")


def _check_data(model: HookedTransformer, config: TrainConfig, data: Sequence[Any],
                retain: Sequence[Example] | None) -> None:
    needs = OBJECTIVES[config.loss]
    if data is None or len(data) == 0:
        raise ValueError(f"the {_set_name(config.loss)} is empty: the {config.loss!r} loss needs "
                         "at least one example")
    want = PreferencePair if config.loss == "dpo" else Example
    bad = next((i for i, d in enumerate(data) if not isinstance(d, want)), None)
    if bad is not None:
        raise TypeError(f"item {bad} of the data is a {type(data[bad]).__name__}; the "
                        f"{config.loss!r} loss needs {want.__name__}s (see interp.training.data)")
    if "retain" in needs and (retain is None or len(retain) == 0):
        raise ValueError(f"the {config.loss!r} loss needs a non-empty retain set (retain=...)")
    if "retain" not in needs and retain:
        raise ValueError(f"the {config.loss!r} loss does not use a retain set; drop retain= or "
                         "choose gd, npo_gd or npo_kl")
    examples = [e for d in data for e in (d if isinstance(d, PreferencePair) else (d,))]
    for e in examples + list(retain or []):
        if e.n_targets == 0:
            raise ValueError(f"an example ({e.tokens[:8]}...) has no target tokens (its loss mask "
                             "is False after position 0); drop it or fix its mask")
        if max(e.tokens) >= model.cfg.d_vocab or min(e.tokens) < 0:
            raise ValueError(f"a token id {max(e.tokens)} lies outside the model's vocabulary "
                             f"of {model.cfg.d_vocab}; were the examples built for another model?")


def _micro_batches(config: TrainConfig, data: Sequence[Any], retain: Sequence[Example] | None,
                   k: int, device: str | torch.device) -> dict[str, Batch]:
    idx = batch_indices(k, len(data), config.batch_size, config.seed, config.shuffle)
    items = [data[i] for i in idx]
    if config.loss == "dpo":
        out = {"chosen": collate([p.chosen for p in items], device),
               "rejected": collate([p.rejected for p in items], device)}
    else:
        out = {"data": collate(items, device)}
    if retain:
        ridx = batch_indices(k, len(retain), config.batch_size, config.seed + 1, config.shuffle)
        out["retain"] = collate([retain[i] for i in ridx], device)
    return out


def _frozen_copy(model: HookedTransformer) -> HookedTransformer:
    memo = {id(model.tokenizer): model.tokenizer} if model.tokenizer is not None else {}
    ref = copy.deepcopy(model, memo)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def _checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("step-*.pt"))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_checkpoint(directory: Path, step: int, scope: AppliedScope, optimizer, scheduler,
                     history: dict[str, Any], config: TrainConfig) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:07d}.pt"
    payload = {
        "step": step,
        "trainable": {n: p.detach().cpu().clone() for n, p in scope.params.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "history": history,
        "config": config.to_dict(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    for old in _checkpoints(directory)[:-max(1, config.keep_checkpoints)]:
        old.unlink()
    return path


def _load_checkpoint(directory: Path, scope: AppliedScope, optimizer, scheduler,
                     config: TrainConfig) -> tuple[int, dict[str, Any]] | None:
    found = _checkpoints(directory)
    if not found:
        return None
    payload = torch.load(found[-1], map_location="cpu", weights_only=True)
    saved = dict(payload["config"])
    current = config.to_dict()
    differ = [k for k in current if k not in _RUN_ONLY_FIELDS
              and _normalise(saved.get(k)) != _normalise(current[k])]
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in differ)
        raise ValueError(f"the checkpoint {found[-1]} was written with another configuration "
                         f"({details}); resume with the same settings or use a new checkpoint_dir")
    missing = set(scope.params) ^ set(payload["trainable"])
    if missing:
        raise ValueError(f"the checkpoint {found[-1]} holds other trainable parameters than this "
                         f"scope (differing: {', '.join(sorted(missing)[:5])}); use the same scope")
    with torch.no_grad():
        for name, p in scope.params.items():
            p.copy_(payload["trainable"][name])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
    if "cuda" in payload["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return int(payload["step"]), payload["history"]


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def train(
    model: HookedTransformer,
    config: TrainConfig,
    data: Sequence[Example] | Sequence[PreferencePair],
    retain: Sequence[Example] | None = None,
    reference: HookedTransformer | None = None,
    scope: Scope | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[StepInfo], bool | None]] = (),
) -> TrainingResult:
    """Fine-tune `model` in place.

    Args:
        model: trained in place, on its own device and dtype (losses are computed in float32;
            bfloat16 weights are updated in bfloat16).
        config: the `TrainConfig`.
        data: SFT examples, the forget set (`ga`, `gd`, `npo*`), or `PreferencePair`s (`dpo`);
            see `interp.training.data`.
        retain: the retain set of `gd`, `npo_gd`, `npo_kl`.
        reference: the frozen reference of `npo*` / `dpo`; default a frozen copy of `model`
            as it is when `train` is called.
        scope: which parameters change (`interp.training.scopes`); default `Full()`.
        resume: continue from the latest checkpoint in `config.checkpoint_dir` (if any);
            `model` must be in the run's starting state.
        callbacks: called after every step with a `StepInfo`; returning True stops the run.
            An exception raised by a callback propagates (the last checkpoint stays).

    Returns:
        A `TrainingResult`. LoRA adapters stay on the model (`scopes.merge_lora` merges them).

    Raises:
        ValueError: an empty data set, a missing retain set or reference, a reference with
            another vocabulary, token ids outside the vocabulary, a checkpoint of another
            configuration.
    """
    _check_config(config)
    _check_data(model, config, data, retain)
    if resume and not config.checkpoint_dir:
        raise ValueError("resume=True needs config.checkpoint_dir")
    needs_ref = "reference" in OBJECTIVES[config.loss]
    if needs_ref:
        reference = _frozen_copy(model) if reference is None else reference
        check_reference(model, reference)
    elif reference is not None:
        raise ValueError(f"the {config.loss!r} loss does not use a reference model")

    per_epoch = -(-len(data) // config.batch_size)
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))
    applied = (scope or Full()).apply(model)
    params = list(applied.params.values())
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                                      weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, config.warmup_steps, config.schedule,
                                       config.min_lr_ratio))
    history: dict[str, Any] = {"losses": [], "parts": {}, "lrs": [], "grad_norms": []}
    start = 0
    directory = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if directory is not None and not resume and _checkpoints(directory):
        raise ValueError(f"{directory} already holds checkpoints of a run; pass resume=True to "
                         "continue it, or use a new checkpoint_dir")
    if resume and directory is not None:
        loaded = _load_checkpoint(directory, applied, optimizer, scheduler, config)
        if loaded is not None:
            start, history = loaded
    else:
        torch.manual_seed(config.seed)
    device = model.cfg.device
    bar = tqdm(total=total, initial=start, desc=f"train {config.loss}", unit="step",
               disable=not config.progress)
    t0 = time.perf_counter()
    tokens = 0
    step = start
    stopped = False
    last_checkpoint = str(_checkpoints(directory)[-1]) if directory and _checkpoints(directory) else None
    try:
        while step < total:
            lr = optimizer.param_groups[0]["lr"]
            step_loss = 0.0
            step_parts: dict[str, float] = {}
            for micro in range(config.grad_accum):
                batches = _micro_batches(config, data, retain, step * config.grad_accum + micro, device)
                value = objective(config.loss, model, batches, reference, beta=config.beta,
                                  retain_weight=config.retain_weight)
                (value.loss / config.grad_accum).backward()
                step_loss += float(value.loss.detach()) / config.grad_accum
                for k, v in value.parts.items():
                    step_parts[k] = step_parts.get(k, 0.0) + v / config.grad_accum
                tokens += sum(int(b.loss_mask.sum()) for b in batches.values())
            applied.mask_gradients()
            grads = [p.grad for p in params if p.grad is not None]
            if config.max_grad_norm is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            else:
                norm = float(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0
            optimizer.step()
            applied.after_step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history["losses"].append(step_loss)
            history["lrs"].append(lr)
            history["grad_norms"].append(norm)
            for k, v in step_parts.items():
                history["parts"].setdefault(k, []).append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if directory is not None and (
                (config.checkpoint_every and step % config.checkpoint_every == 0) or step == total
            ):
                last_checkpoint = str(_save_checkpoint(directory, step, applied, optimizer,
                                                       scheduler, history, config))
            info = StepInfo(step, step_loss, step_parts, lr, norm, model)
            if [cb for cb in callbacks if cb(info)] and step < total:
                stopped = True
                break
    finally:
        bar.close()
        applied.close()
    seconds = time.perf_counter() - t0
    done = step - start
    return TrainingResult(
        losses=history["losses"], parts=history["parts"], lrs=history["lrs"],
        grad_norms=history["grad_norms"], steps=step, total_steps=total, resumed_from=start,
        stopped_early=stopped, seconds=seconds, seconds_per_step=seconds / max(1, done),
        tokens=tokens, trainable=list(applied.params), n_trainable=applied.n_trainable,
        checkpoint=last_checkpoint, config=config.to_dict(),
    )
