"""Train SAEs offline: on a model's activations with SAELens's runner, or on raw tensors.

`train_sae(model, hook_name, architecture=...)` trains on the shared text corpus
(`interp.saes.corpus`, training split) with SAELens's `LanguageModelSAETrainingRunner`, given
our `HookedTransformer` (`override_model`) and an in-memory tokenised `datasets.Dataset`
(`override_dataset`), with wandb, checkpoints and SAELens's own output directory off. The
activations come from one of two places:

- `activations="cache"` (default): computed once by `interp.saes.activations.cache_activations`
  and read back by the runner (`use_cached_activations`). Several passes over them (`epochs`)
  and several SAEs on the same tokens and hook cost one set of forward passes; on a CPU the
  forward passes are most of the cost;
- `activations="stream"`: the runner runs the model for every batch, as it normally does.

Any architecture in SAELens's training registry works (`topk`, `batchtopk`, `standard`,
`jumprelu`, `gated`, `matryoshka_batchtopk`, ...); `k` applies to the TopK family, other
fields (`l1_coefficient`, `target_l0`, ...) go in `sae_kwargs`. BatchTopK SAEs are saved, as
SAELens does, as JumpReLU SAEs with the learnt threshold; that threshold is a moving average
starting at 0, so its rate (`topk_threshold_lr`, SAELens default 0.01, ~500 steps to settle)
defaults here to `clip(20 / steps, 0.01, 0.1)` so that short runs end with a settled threshold.

Defaults aimed at a CPU: 4x expansion, k=32, batches of 1024 tokens, Adam at lr 1e-3 with a
5% warm-up and cosine decay to lr/10, activations rescaled to norm sqrt(d_in) during training
(`expected_average_only_in`, folded into the weights at the end), position 0 of each context
skipped (an attention sink in BOS-less models; see `interp.saes.corpus`). TopK's auxiliary loss
revives latents that have not fired for `dead_feature_window` steps (default: a sixth of
training).

The result is saved with `save_inference_model` (`cfg.json`, `sae_weights.safetensors`) plus
`runner_cfg.json` and `train_report.json`, loaded back from that directory and returned with a
`TrainReport` (timings, sizes, held-out `Quality`). Default directory:
`saes_dir()/<model>/<hook>/<architecture>-<d_sae>[-k<k>]-s<seed>`.

`train_on_activations(acts, ...)` trains on a tensor of activations with SAELens's `SAETrainer`
(the runner's inner loop), shuffling every epoch with a seeded generator: for synthetic data and
for activations obtained elsewhere.

Runs are deterministic for a given seed on a given machine (the seed fixes the SAE's
initialisation, the token sample and all shuffling).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from sae_lens import SAE, TrainingSAE
from torch import Tensor
from transformer_lens import HookedTransformer

from interp import models
from interp.saes.activations import cache_activations, model_tag
from interp.saes.corpus import HELDOUT_FILES, TRAIN_FILES, corpus_contexts
from interp.saes.load import load_local, saes_dir
from interp.saes.quality import Quality, evaluate

__all__ = [
    "TOPK_FAMILY",
    "TrainReport",
    "default_out_dir",
    "to_inference",
    "train_on_activations",
    "train_or_load",
    "train_sae",
    "training_architectures",
    "training_sae_config",
]

#: Architectures whose sparsity is set by `k` (active latents per token, or per batch on average).
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")


def training_architectures() -> list[str]:
    """Architectures SAELens can train (its training registry)."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    return sorted(SAE_TRAINING_CLASS_REGISTRY)


def training_sae_config(
    architecture: str,
    d_in: int,
    d_sae: int,
    *,
    k: int | None = 32,
    normalize_activations: str = "expected_average_only_in",
    device: str = "cpu",
    dtype: str = "float32",
    **sae_kwargs: Any,
):
    """The SAELens `TrainingSAEConfig` of `architecture` (`k` is used by the TopK family only).

    Raises:
        ValueError: unknown architecture or a field it does not have.
    """
    from dataclasses import fields

    from sae_lens.registry import get_sae_training_class

    if architecture not in training_architectures():
        raise ValueError(f"Unknown SAE architecture {architecture!r}; SAELens trains: "
                         f"{', '.join(training_architectures())}.")
    _, cfg_cls = get_sae_training_class(architecture)
    kwargs: dict[str, Any] = dict(d_in=d_in, d_sae=d_sae, device=device, dtype=dtype,
                                  normalize_activations=normalize_activations, **sae_kwargs)
    if architecture in TOPK_FAMILY and k is not None:
        if k > d_sae:
            raise ValueError(f"k={k} exceeds d_sae={d_sae}.")
        kwargs["k"] = k
    valid = {f.name for f in fields(cfg_cls)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"{cfg_cls.__name__} has no field(s) {unknown}; it has {sorted(valid)}.")
    return cfg_cls(**kwargs)


def to_inference(training_sae: TrainingSAE) -> SAE:
    """The inference SAE of a trained `TrainingSAE`, in memory (what `save_inference_model`
    followed by `SAE.load_from_disk` gives: TopK decoder norms folded, BatchTopK -> JumpReLU)."""
    state = {k: v.detach().clone() for k, v in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)
    cfg = json.loads(json.dumps(training_sae.cfg.get_inference_sae_cfg_dict(), default=_json_default))
    sae = SAE.from_dict(cfg)
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state)
    return sae.to(training_sae.W_dec.device)


@dataclass
class TrainReport:
    """What a training run did and how good its SAE is.

    Attributes:
        model: model name.
        hook_name: where the SAE reads.
        architecture: training architecture (`topk`, `batchtopk`, ...).
        saved_architecture: the architecture of the saved inference SAE (`jumprelu` for BatchTopK).
        d_in, d_sae, k: sizes (`k` None outside the TopK family).
        context_size, skip_first: contexts of the corpus and leading positions skipped.
        n_tokens: distinct activation vectors trained on.
        training_tokens: samples seen, all epochs together.
        epochs: `training_tokens / n_tokens`.
        steps, batch_size_tokens, lr: optimisation.
        seed: the seed.
        activations: "cache" or "stream".
        wall_s_activations: seconds to compute (or find) the cached activations.
        wall_s_train: seconds in SAELens's runner.
        wall_s_eval: seconds in the held-out evaluation.
        wall_s_total: all of it, loading included.
        train_l0, train_dead: SAELens's end-of-training metadata (last sparsity window).
        quality: held-out `Quality` (None when `eval_tokens` was 0).
        out_dir: where the SAE was saved.
        activation_cache: the activation cache used (cache mode).
        train_files, heldout_files: corpus files.
        device: where it trained.
        threads: torch CPU threads.
    """

    model: str
    hook_name: str
    architecture: str
    saved_architecture: str
    d_in: int
    d_sae: int
    k: int | None
    context_size: int
    skip_first: int
    n_tokens: int
    training_tokens: int
    epochs: float
    steps: int
    batch_size_tokens: int
    lr: float
    seed: int
    activations: str
    wall_s_activations: float
    wall_s_train: float
    wall_s_eval: float
    wall_s_total: float
    train_l0: float | None
    train_dead: float | None
    quality: Quality | None
    out_dir: str
    activation_cache: str | None
    train_files: tuple[str, ...] = TRAIN_FILES
    heldout_files: tuple[str, ...] = HELDOUT_FILES
    device: str = "cpu"
    threads: int = field(default_factory=torch.get_num_threads)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["quality"] = self.quality.to_dict() if self.quality is not None else None
        return out

    def summary(self) -> str:
        q = self.quality.summary() if self.quality is not None else "not evaluated"
        return (f"{self.architecture} d_sae={self.d_sae} k={self.k} at {self.hook_name}: "
                f"{self.n_tokens} tokens x {self.epochs:.1f} epochs, {self.steps} steps; "
                f"activations {self.wall_s_activations:.0f}s, training {self.wall_s_train:.0f}s, "
                f"total {self.wall_s_total:.0f}s. Held-out: {q}")


def default_out_dir(model_name: str, hook_name: str, architecture: str, d_sae: int,
                    k: int | None, seed: int) -> Path:
    """`saes_dir()/<model>/<hook>/<architecture>-<d_sae>[-k<k>]-s<seed>`."""
    tag = f"{architecture}-{d_sae}" + (f"-k{k}" if k is not None else "") + f"-s{seed}"
    return saes_dir() / model_name.replace("/", "__") / hook_name / tag


def train_sae(
    model: str | HookedTransformer,
    hook_name: str,
    architecture: str = "topk",
    *,
    d_sae: int | None = None,
    k: int | None = 32,
    n_tokens: int = 150_000,
    epochs: float = 2.0,
    context_size: int = 128,
    skip_first: int = 1,
    batch_size_tokens: int = 1024,
    lr: float = 1e-3,
    lr_warm_up_frac: float = 0.05,
    seed: int = 0,
    out_dir: str | Path | None = None,
    device: str | None = None,
    activations: Literal["cache", "stream"] | str | Path = "cache",
    eval_tokens: int = 8192,
    eval_ce_tokens: int = 4096,
    normalize_activations: str = "expected_average_only_in",
    dead_feature_window: int | None = None,
    sae_kwargs: dict[str, Any] | None = None,
    verbose: bool = True,
) -> tuple[SAE, TrainReport]:
    """Train an SAE on `model`'s activations at `hook_name` over the corpus (module docstring).

    Args:
        model: a name for `interp.models.load` (loaded with weight processing) or a model.
        hook_name: e.g. `blocks.15.hook_resid_pre` or `blocks.15.hook_mlp_out`.
        architecture: an entry of `training_architectures()`.
        d_sae: latents (default 4 * d_in).
        k: active latents per token for the TopK family (ignored otherwise).
        n_tokens: distinct training tokens drawn from the training split (rounded up to whole
            contexts; positions before `skip_first` are not trained on).
        epochs: passes over them.
        context_size: tokens per context.
        skip_first: leading positions of each context left out.
        batch_size_tokens: activations per SAE step.
        lr: peak learning rate (warm-up over `lr_warm_up_frac` of the steps, then cosine to lr/10).
        seed: seeds initialisation, token sampling and shuffling.
        out_dir: where to save (default `default_out_dir(...)`); an existing SAE there is
            overwritten.
        device: "cpu"/"cuda" (default: the model's device).
        activations: "cache", "stream", or the path of an existing activation cache (from
            `cache_activations` with these tokens and this hook).
        eval_tokens: held-out tokens for the `Quality` in the report (0: skip).
        eval_ce_tokens: how many of them the cross-entropy passes use (three full forward
            passes each).
        normalize_activations: SAELens's input normalisation during training.
        dead_feature_window: steps without firing after which a latent counts as dead (feeds
            TopK's auxiliary loss); default a sixth of the steps (at least 10).
        sae_kwargs: extra fields of the architecture's training config.
        verbose: print progress.

    Returns:
        (the inference SAE loaded back from `out_dir`, its `TrainReport`).
    """
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    t_start = time.perf_counter()
    if isinstance(model, str):
        model = models.load(model, device=device)
    model_name = model_tag(model)
    device = str(device or model.W_E.device)
    if hook_name not in model.hook_dict:
        raise ValueError(f"{model_name} has no hook point {hook_name!r} (see model.hook_dict).")

    torch.manual_seed(seed)
    tokens = corpus_contexts(model, "train", context_size=context_size, n_tokens=n_tokens, seed=seed)
    positions = context_size - skip_first

    t0 = time.perf_counter()
    cache_path: str | None = None
    if activations == "stream":
        d_in = _activation_width(model, hook_name, tokens[:1])
    else:
        path = None if activations == "cache" else Path(activations)
        info = cache_activations(model, tokens, [hook_name], path, skip_first=skip_first,
                                 verbose=verbose)
        cache_path, d_in = info.path, info.d_in[hook_name]
    wall_acts = time.perf_counter() - t0

    d_sae = d_sae or 4 * d_in
    k_used = k if architecture in TOPK_FAMILY else None
    n_distinct = tokens.shape[0] * positions
    training_tokens = int(n_distinct * epochs)
    steps = training_tokens // batch_size_tokens
    if steps < 1:
        raise ValueError(f"{training_tokens} training tokens make no step of {batch_size_tokens}.")
    sae_cfg = training_sae_config(architecture, d_in, d_sae, k=k_used,
                                  normalize_activations=normalize_activations, device=device,
                                  **_default_sae_kwargs(architecture, steps, sae_kwargs))
    store_rows = 8
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=model_name,
        hook_name=hook_name,
        dataset_path="interp-corpus",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=positions if cache_path else context_size,
        seqpos_slice=(None,) if cache_path else (skip_first, None),
        use_cached_activations=cache_path is not None,
        cached_activations_path=cache_path,
        training_tokens=training_tokens,
        train_batch_size_tokens=batch_size_tokens,
        store_batch_size_prompts=store_rows,
        n_batches_in_buffer=max(store_rows, -(-8 * batch_size_tokens // positions)),  # ~8 batches
        prepend_bos=bool(model.cfg.default_prepend_bos),
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=int(lr_warm_up_frac * steps),
        dead_feature_window=dead_feature_window or max(10, steps // 6),
        feature_sampling_window=max(steps, 1),
        n_batches_for_norm_estimate=min(50, max(5, steps // 10)),
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
        device=device,
        act_store_device=device,
        seed=seed,
        dtype="float32",
        verbose=False,
        model_from_pretrained_kwargs={},  # the model is given; nothing to load
    )
    dataset = Dataset.from_dict({"tokens": tokens.tolist()})
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with _quiet_sae_lens(), _restore_signal_handlers():
        runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
        trained = runner.run()
    wall_train = time.perf_counter() - t0

    meta = trained.cfg.metadata
    meta.model_name = model_name
    meta.hook_name = hook_name
    meta.context_size = context_size
    meta.seqpos_slice = (skip_first, None)
    meta.prepend_bos = bool(model.cfg.default_prepend_bos)
    meta.dataset_path = "interp corpus: " + ", ".join(TRAIN_FILES)
    meta.interp = {"model": model_name, "processing": _is_processed(model), "seed": seed,
                   "n_tokens": n_distinct, "epochs": epochs, "activations": activations
                   if isinstance(activations, str) else str(activations)}
    out = Path(out_dir) if out_dir is not None else default_out_dir(
        model_name, hook_name, architecture, d_sae, k_used, seed)
    out.mkdir(parents=True, exist_ok=True)
    trained.save_inference_model(out)
    (out / "runner_cfg.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=_json_default))
    sae = SAE.load_from_disk(out, device=device)

    t0 = time.perf_counter()
    quality = None
    if eval_tokens:
        held = corpus_contexts(model, "heldout", context_size=context_size, n_tokens=eval_tokens,
                               seed=seed)
        quality = evaluate(model, sae, hook_name, held,
                           ce_contexts=max(1, -(-eval_ce_tokens // context_size)))
    wall_eval = time.perf_counter() - t0

    report = TrainReport(
        model=model_name, hook_name=hook_name, architecture=architecture,
        saved_architecture=sae.cfg.architecture(), d_in=d_in, d_sae=d_sae, k=k_used,
        context_size=context_size, skip_first=skip_first, n_tokens=n_distinct,
        training_tokens=training_tokens, epochs=training_tokens / n_distinct, steps=steps,
        batch_size_tokens=batch_size_tokens, lr=lr, seed=seed,
        activations="stream" if activations == "stream" else "cache",
        wall_s_activations=wall_acts, wall_s_train=wall_train, wall_s_eval=wall_eval,
        wall_s_total=time.perf_counter() - t_start,
        train_l0=_float_or_none(meta.l0), train_dead=_float_or_none(meta.num_dead_features),
        quality=quality, out_dir=str(out), activation_cache=cache_path, device=device,
    )
    (out / "train_report.json").write_text(json.dumps(report.to_dict(), indent=1, default=_json_default))
    if verbose:
        print(report.summary(), flush=True)
    return sae, report


def train_or_load(
    model: HookedTransformer,
    hook_names: list[str],
    architecture: str = "topk",
    *,
    k: int | None = 32,
    expansion: int = 4,
    n_tokens: int = 60_000,
    epochs: float = 2.0,
    eval_tokens: int = 4096,
    seed: int = 0,
    prefix: str = "trained",
    verbose: bool = True,
) -> tuple[dict[str, SAE], dict[str, dict[str, Any]]]:
    """SAEs at `hook_names`, loaded when a run with the same settings saved them before, else
    trained (`train_sae`) from one shared activation cache over the corpus.

    Each SAE lives in `saes_dir()/<model>/<hook>/<prefix>-<architecture>-<d_sae>[-k<k>]-n<n_tokens>-s<seed>`
    (the settings that decide it, so a directory is never reused for other ones; `epochs` and
    `eval_tokens` are left out, as before). Returns `{hook: SAE}` and `{hook: {"dir", "quality",
    "wall_s_train", "wall_s_total", "steps"}}` from each SAE's `train_report.json`.
    """
    d_sae = expansion * model.cfg.d_model
    tag = f"{prefix}-{architecture}-{d_sae}" + (f"-k{k}" if architecture in TOPK_FAMILY else "")
    dirs = {h: saes_dir() / model_tag(model) / h / f"{tag}-n{n_tokens}-s{seed}" for h in hook_names}
    missing = [h for h in hook_names if not (dirs[h] / "train_report.json").exists()]
    cache = None
    if missing:
        tokens = corpus_contexts(model, "train", context_size=128, n_tokens=n_tokens, seed=seed)
        cache = cache_activations(model, tokens, missing).path
    saes, info = {}, {}
    for h in hook_names:
        if h in missing:
            if verbose:
                print(f"training {h} ...", flush=True)
            train_sae(model, h, architecture, d_sae=d_sae, k=k, n_tokens=n_tokens, epochs=epochs,
                      seed=seed, out_dir=dirs[h], activations=cache, eval_tokens=eval_tokens,
                      eval_ce_tokens=eval_tokens // 2, verbose=verbose)
        saes[h] = load_local(dirs[h], device=str(model.W_E.device))
        report = json.loads((dirs[h] / "train_report.json").read_text())
        info[h] = {"dir": str(dirs[h]), "quality": report.get("quality"),
                   "wall_s_train": report.get("wall_s_train"),
                   "wall_s_total": report.get("wall_s_total"), "steps": report.get("steps")}
    return saes, info


def train_on_activations(
    acts: Float[Tensor, "n d_in"],
    architecture: str = "topk",
    d_sae: int | None = None,
    k: int | None = 32,
    *,
    epochs: float = 1.0,
    batch_size: int = 1024,
    lr: float = 1e-3,
    lr_warm_up_frac: float = 0.05,
    seed: int = 0,
    normalize_activations: str = "none",
    dead_feature_window: int | None = None,
    sae_kwargs: dict[str, Any] | None = None,
    hook_name: str | None = None,
) -> SAE:
    """Train an SAE on a tensor of activations with SAELens's `SAETrainer`; return it for inference.

    Each epoch visits every row once in a fresh seeded random order (the last partial batch of
    an epoch rolls over into the next). `hook_name` only goes into the SAE's metadata.
    """
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    if acts.ndim != 2:
        raise ValueError(f"acts must be [n, d_in], got shape {tuple(acts.shape)}.")
    n, d_in = acts.shape
    d_sae = d_sae or 4 * d_in
    training_samples = int(n * epochs)
    steps = training_samples // batch_size
    if steps < 1:
        raise ValueError(f"{training_samples} samples make no step of {batch_size}.")
    torch.manual_seed(seed)
    cfg = training_sae_config(architecture, d_in, d_sae,
                              k=k if architecture in TOPK_FAMILY else None,
                              normalize_activations=normalize_activations,
                              device=str(acts.device),
                              **_default_sae_kwargs(architecture, steps, sae_kwargs))
    if hook_name:
        cfg.metadata.hook_name = hook_name
    sae_cls, _ = get_sae_training_class(architecture)
    training_sae = sae_cls(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=training_samples,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=int(lr_warm_up_frac * steps),
        device=str(acts.device),
        dead_feature_window=dead_feature_window or max(10, steps // 6),
        feature_sampling_window=max(steps, 1),
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=min(50, max(5, steps // 10)),
    )
    data = _EpochShuffler(acts, batch_size, seed)
    with _quiet_sae_lens():
        SAETrainer(cfg=trainer_cfg, sae=training_sae, data_provider=data).fit()
    return to_inference(training_sae)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _EpochShuffler(Iterator[Tensor]):
    """Endless batches of rows of `data`, a new seeded permutation every epoch."""

    def __init__(self, data: Tensor, batch_size: int, seed: int):
        self.data = data
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)

    def __iter__(self) -> _EpochShuffler:
        return self

    def __next__(self) -> Tensor:
        while self.order.numel() < self.batch_size:
            self.order = torch.cat([self.order, torch.randperm(self.data.shape[0], generator=self.gen)])
        idx, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        return self.data[idx.to(self.data.device)]


def _default_sae_kwargs(architecture: str, steps: int, given: dict[str, Any] | None) -> dict[str, Any]:
    """`given`, plus a BatchTopK threshold rate that settles within a short run: the threshold
    is an exponential moving average starting at 0, so SAELens's rate 0.01 needs ~500 steps."""
    kwargs = dict(given or {})
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        kwargs.setdefault("topk_threshold_lr", min(0.1, max(0.01, 20.0 / steps)))
    return kwargs


def _activation_width(model: HookedTransformer, hook_name: str, tokens: Tensor) -> int:
    from interp.saes.activations import stop_layer

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(model.W_E.device), names_filter=[hook_name],
                                        stop_at_layer=stop_layer([hook_name]))
    return int(cache[hook_name].flatten(2).shape[-1])


def _is_processed(model: HookedTransformer) -> bool:
    return str(model.cfg.normalization_type or "").endswith("Pre")


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextmanager
def _quiet_sae_lens() -> Iterator[None]:
    """SAELens warns that our dataset and model override its config; that is the point."""
    log = logging.getLogger("sae_lens")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(fewer samples|pretokenized dataset has|"
                                    "beginning new epoch|Dataset is not tokenized|To copy construct).*")
            yield
    finally:
        log.setLevel(level)


@contextmanager
def _restore_signal_handlers() -> Iterator[None]:
    """SAELens's runner installs SIGINT/SIGTERM handlers; put the previous ones back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
