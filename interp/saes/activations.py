"""Cache a model's activations on disk once, in the format SAELens's training runner reads.

Running the language model is most of the cost of training an SAE on a CPU (SmolLM2 up to its
middle layer: a few hundred tokens per second on 2 cores), while SAE steps are cheap. So the
activations of a token set are computed once, for several hooks in the same forward pass, and
every SAE trained on them (other architectures, sizes, epochs) reads them from disk.

The cache is a Hugging Face `datasets` directory (`save_to_disk`), as SAELens's
`CacheActivationsRunner` writes it and `LanguageModelSAERunnerConfig(use_cached_activations=True,
cached_activations_path=...)` reads it: one row per context, one column per hook name holding an
`Array2D(context, d_in)`, plus `token_ids`. Positions before `skip_first` are not stored (the
attention-sink first token of a context), so a row holds `context_size - skip_first` positions.
`interp_activations.json` beside it records the model, hooks, shape and a hash of the tokens;
a later call with the same model, hooks and tokens reuses the cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp import models

__all__ = ["ActivationCacheInfo", "activations_dir", "cache_activations", "load_activations",
           "model_tag", "stop_layer"]

META_FILENAME = "interp_activations.json"


@dataclass(frozen=True)
class ActivationCacheInfo:
    """What an activation cache holds.

    Attributes:
        path: the dataset directory (pass as `cached_activations_path`).
        model: `model_tag(model)`.
        hook_names: one column per hook.
        d_in: hook -> activation width (trailing axes flattened).
        n_contexts: rows.
        positions: stored positions per row (`context_size - skip_first`).
        context_size: tokens per context, as given.
        skip_first: leading positions not stored.
        tokens_sha: hash of the token ids (identifies the token set).
        wall_s: seconds it took to compute and write.
    """

    path: str
    model: str
    hook_names: tuple[str, ...]
    d_in: dict[str, int]
    n_contexts: int
    positions: int
    context_size: int
    skip_first: int
    tokens_sha: str
    wall_s: float

    @property
    def n_tokens(self) -> int:
        """Stored activation vectors per hook."""
        return self.n_contexts * self.positions


def activations_dir() -> Path:
    """`<interp cache>/activations` (created)."""
    path = models.cache_dir() / "activations"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_tag(model: HookedTransformer) -> str:
    """A short name for `model` in paths and metadata: its interp name when `models.load` gave it
    one (embedded and tiny models), the last part of a local path, else `cfg.model_name` itself
    (e.g. a Hub id)."""
    name = str(model.cfg.model_name)
    if name in models.EMBEDDED_MODELS or name in models.TINY_MODELS or not Path(name).exists():
        return name
    return Path(name).name


def stop_layer(hook_names: Sequence[str]) -> int | None:
    """The `stop_at_layer` that still computes every hook in `hook_names` (None: all layers)."""
    layers = []
    for name in hook_names:
        parts = name.split(".")
        if parts[0] != "blocks":
            return None
        layers.append(int(parts[1]) + 1)
    return max(layers) if layers else None


def cache_activations(
    model: HookedTransformer,
    tokens: Int[Tensor, "n_contexts context_size"],
    hook_names: Sequence[str],
    path: str | Path | None = None,
    *,
    skip_first: int = 1,
    batch_size: int = 16,
    verbose: bool = True,
) -> ActivationCacheInfo:
    """Compute the activations of `tokens` at `hook_names` and write them to `path`.

    Args:
        model: the model (its weights as used later; no SAEs attached).
        tokens: contexts, as from `interp.saes.corpus.corpus_contexts`.
        hook_names: hooks to store, computed in the same forward passes.
        path: the dataset directory; default `activations_dir()/<model>/<hash>`.
        skip_first: leading positions of each context not stored.
        batch_size: contexts per forward pass.
        verbose: print progress.

    Returns:
        `ActivationCacheInfo`; an existing cache with the same model, hooks, tokens and
        `skip_first` is reused as is.
    """
    import datasets
    from datasets import Array2D, Dataset, Features, Value
    from datasets import Sequence as HFSequence

    hook_names = tuple(dict.fromkeys(hook_names))
    missing = [h for h in hook_names if h not in model.hook_dict]
    if missing:
        raise ValueError(f"{model.cfg.model_name} has no hook point(s) {missing}.")
    n, ctx = tokens.shape
    if not 0 <= skip_first < ctx:
        raise ValueError(f"skip_first={skip_first} must be in [0, context_size={ctx}).")
    sha = _tokens_sha(tokens)
    if path is None:
        key = hashlib.sha256(f"{sha}|{'|'.join(hook_names)}|{skip_first}".encode()).hexdigest()[:16]
        path = activations_dir() / model_tag(model).replace("/", "__") / key
    path = Path(path)
    existing = _read_meta(path)
    if existing is not None and (existing.model, existing.tokens_sha, existing.skip_first) == (
        model_tag(model), sha, skip_first) and set(hook_names) <= set(existing.hook_names):
        return existing

    if path.exists() and existing is None and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not an interp activation cache (no "
                              f"{META_FILENAME}); choose an empty or new directory.")

    t0 = time.perf_counter()
    positions = ctx - skip_first
    stop = stop_layer(hook_names)
    buffers: dict[str, np.ndarray] = {}
    device = model.W_E.device
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = tokens[start:start + batch_size].to(device)
            _, cache = model.run_with_cache(batch, names_filter=list(hook_names), stop_at_layer=stop)
            for h in hook_names:
                act = cache[h][:, skip_first:].flatten(2).float().cpu().numpy()
                if h not in buffers:
                    buffers[h] = np.empty((n, positions, act.shape[-1]), dtype=np.float32)
                buffers[h][start:start + batch.shape[0]] = act
            if verbose and (start // batch_size) % 20 == 0:
                done = min(start + batch_size, n)
                rate = done * ctx / (time.perf_counter() - t0)
                print(f"  activations: {done}/{n} contexts ({rate:.0f} tokens/s)", flush=True)
    d_in = {h: int(b.shape[-1]) for h, b in buffers.items()}
    features = Features({
        **{h: Array2D(shape=(positions, d_in[h]), dtype="float32") for h in hook_names},
        "token_ids": HFSequence(Value("int32"), length=positions),
    })
    token_ids = tokens[:, skip_first:].to(torch.int32).numpy()
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        chunks = [
            Dataset.from_dict({**{h: buffers[h][i:i + 256] for h in hook_names},
                               "token_ids": token_ids[i:i + 256]}, features=features)
            for i in range(0, n, 256)
        ]
        dataset = datasets.concatenate_datasets(chunks)
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_to_disk(str(path))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    info = ActivationCacheInfo(
        path=str(path), model=model_tag(model), hook_names=hook_names, d_in=d_in,
        n_contexts=n, positions=positions, context_size=ctx, skip_first=skip_first,
        tokens_sha=sha, wall_s=time.perf_counter() - t0,
    )
    (path / META_FILENAME).write_text(json.dumps(asdict(info), indent=1))
    return info


def load_activations(path: str | Path, hook_name: str) -> Float[Tensor, "n_tokens d_in"]:
    """All activations of one hook in a cache, flattened over contexts and positions."""
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if hook_name not in dataset.column_names:
        raise ValueError(f"The activation cache at {path} has no {hook_name!r}; it holds "
                         f"{[c for c in dataset.column_names if c != 'token_ids']}.")
    dataset.set_format(type="torch", columns=[hook_name])
    acts = dataset[:][hook_name]
    return acts.reshape(-1, acts.shape[-1])


def _read_meta(path: Path) -> ActivationCacheInfo | None:
    meta = path / META_FILENAME
    if not meta.exists():
        return None
    raw = json.loads(meta.read_text())
    raw["hook_names"] = tuple(raw["hook_names"])
    return ActivationCacheInfo(**raw)


def _tokens_sha(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
