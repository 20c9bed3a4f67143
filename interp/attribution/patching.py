"""Exact activation patching, batched over sites: the ground truth for attribution methods.

For each site (see `sites.py`) the activation of a *target* run is replaced by that of a
*source* run and the metric is measured on the patched target run. Direction `"denoise"`
patches clean activations into the corrupt run (target = corrupt), `"noise"` patches corrupt
activations into the clean run (target = clean). The score of a site is the mean over prompts
of `metric(patched) - metric(target)`.

How it is fast (DESIGN.md, performance principles), compared with TransformerLens's
`patching.py`, which runs one full forward pass per site:

- many patched runs share one forward pass: for the sites of one layer we stack copies of the
  target batch, `rows = sites x prompts`, and each copy gets its own site patched;
- a patch at layer L cannot change layers before L, so every patched run starts from the
  target's cached `resid_pre` at layer L and runs only blocks L..end;
- the runs of several layers share one *wave* of block calls: the rows patched at layer L join
  the batch at block L, so no row runs a block it does not need, and a wave over all layers
  makes one call per block instead of one per block and patched layer (on a CPU a call has a
  fixed cost of about 50-100 row-positions of work, and larger products run faster per row);
- only the logits the metric reads are computed (`metrics.final_columns`): the final norm at the
  prediction position and a few unembedding columns (or the whole vocabulary there, for metrics
  that read every column), not the whole vocabulary at every position. A metric given as a plain
  function of the full logits is the exception (`metrics.CallableMetric`): each patched run is
  unembedded at every position from `p0` on (earlier positions reuse the target run's logits);
- a patch at position p cannot change positions before p (causal attention), so patches of a
  family with a position axis run on positions p.. only, reading the target run's keys and
  values of earlier positions from a KV cache (TransformerLens's own cache entries);
- positions before the first token where the two batches differ see the same tokens in both
  runs, so every activation there is equal and patching it changes nothing: those sites are
  not run (their effect is exactly 0), and patched runs start at that position;
- rows are chunked so that one block call's activations stay under `memory_gb`;
- weights are stored in the layout TransformerLens rearranges them to on each call
  (`layout.inference_layout`), so its per-call weight copies, about a third of a small block
  call on a CPU, become views.

Prompts of different lengths can share a batch: right-pad them and give the metric each
prompt's `end_pos`. With causal attention the padding never reaches a prompt's prediction.

Any metric works (`metrics.Metric`, or a plain function of the logits): see `metrics.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.hook_points import HookPoint

from interp.attribution.metrics import Metric, MetricLike, as_metric, final_logits
from interp.attribution.sites import FamilySpec, Scores, SiteFamily, default_labels, families, site_config
from interp.layout import inference_layout

Direction = Literal["denoise", "noise"]


def targets(
    clean_tokens: Tensor, corrupt_tokens: Tensor, direction: Direction
) -> tuple[Tensor, Tensor]:
    """(target, source) token batches for a patching direction."""
    if direction == "denoise":
        return corrupt_tokens, clean_tokens
    if direction == "noise":
        return clean_tokens, corrupt_tokens
    raise ValueError(f"direction must be 'denoise' (clean into corrupt) or 'noise', got {direction!r}")


def check_pairs(
    clean_tokens: Tensor, corrupt_tokens: Tensor, metric: MetricLike, d_vocab: int | None = None
) -> Metric:
    """Shapes line up: same [batch, pos] for clean and corrupt, one answer per prompt (and token
    ids inside a vocabulary of `d_vocab`). Returns the metric as a `Metric` bound to the batch
    (`metrics.as_metric`: a plain function is wrapped)."""
    if clean_tokens.ndim != 2 or clean_tokens.shape != corrupt_tokens.shape:
        raise ValueError(
            f"clean and corrupt tokens must both be [batch, pos] of the same shape; got clean "
            f"{tuple(clean_tokens.shape)} and corrupt {tuple(corrupt_tokens.shape)}"
        )
    return as_metric(metric, clean_tokens.shape[0], d_vocab)


def exact_patching(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    site_families: FamilySpec = ("resid", "attn", "mlp", "heads"),
    direction: Direction = "denoise",
    memory_gb: float = 2.0,
    progress: bool = True,
    skip_prefix: bool = True,
    call_cost: float = 64.0,
    checkpoint: str | Path | None = None,
) -> dict[str, Scores]:
    """Patch every site of each family, batched; return `Scores` per family (method `exact`).

    Args:
        model: any HookedTransformer with causal attention.
        clean_tokens, corrupt_tokens: `[batch, pos]`, same shape; right-padded prompts of
            different lengths are fine when `metric.end_pos` marks each prompt's last token.
        metric: any `metrics.Metric` (`LogitDiff`, `LogProb`, `LogSumExpDiff`, `RefusalScore`,
            `KLToClean`, ...), or a plain function of the full logits `[batch, pos, d_vocab]
            -> [batch]` (or a scalar), the slow path: every patched run is unembedded at every
            position into the whole vocabulary.
        site_families: names from `sites.FAMILIES`, or `SiteFamily` objects (e.g. SAE latents).
        direction: `"denoise"` (clean into corrupt, default) or `"noise"`.
        memory_gb: rough bound on the activations of one block call.
        progress: show a progress bar.
        skip_prefix: use causality: run a patch that starts at position `p0` on positions
            `p0..` only, with the target run's keys and values of earlier positions (which the
            patch cannot change) given as a KV cache; and skip positions where clean and
            corrupt tokens agree in every prompt so far, where patching changes nothing.
            Off: every patched run covers every position (slower; a check of the shortcut).
        call_cost: the fixed cost of one block call in units of (row x position) of work, used
            to decide how positions are grouped into chunks (each block call has a fixed
            cost, so many tiny chunks are slower than a few larger ones; on a 2-core CPU one
            call costs about as much as 50-100 row-positions).
        checkpoint: a directory; each family's finished sites are saved there after every
            wave of patched runs (`<family>.pt`) and skipped when the same call runs again,
            so an interrupted run loses at most one wave. Each file carries a fingerprint of
            what its values depend on (`checkpoint_fingerprint`: model name and weights, model
            config, tokens, metric, direction, site family); a file whose fingerprint differs
            from this call's, or that has none, is refused with a `StaleCheckpointError`
            naming the fields that differ. `memory_gb`, `call_cost` and `skip_prefix` only
            change how the runs are batched (the values agree to rounding), so a run may
            resume with other values of them.

    Raises:
        StaleCheckpointError: `checkpoint` holds a file made with other settings.
    """
    metric = check_pairs(clean_tokens, corrupt_tokens, metric, model.cfg.d_vocab)
    target, source = targets(clean_tokens, corrupt_tokens, direction)
    device = model.cfg.device
    target, source = target.to(device), source.to(device)
    fams = families(site_families)
    batch, n_pos = target.shape
    weights = weights_digest(model) if checkpoint is not None else None  # once, for all families
    # inference_layout spares TransformerLens's per-call weight copies; site_config turns on
    # the flags that split q/k/v input sites need (sites.site_config)
    with torch.no_grad(), inference_layout(model), site_config(model, fams):
        run = _target_run(model, target, metric)
        names = {f.hook_name(layer) for f in fams for layer in f.layer_list(model)}
        _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
        p_first = _first_difference(target, source) if skip_prefix else None

        max_sites = _sites_per_chunk(model, n_pos, batch, memory_gb)
        shapes = {f.name: f.site_shape(source_cache[f.hook_name(f.layer_list(model)[0])].shape)
                  for f in fams}
        bar = tqdm(total=sum(math.prod(shapes[f.name]) * len(f.layer_list(model)) for f in fams),
                   desc="exact patching", disable=not progress, unit="site")
        results = {}
        for fam in fams:
            shape, layers = shapes[fam.name], fam.layer_list(model)
            saved, stamp = None, None
            if checkpoint is not None:
                saved = Path(checkpoint) / f"{fam.name}.pt"
                stamp = checkpoint_fingerprint(model, clean_tokens, corrupt_tokens, metric, fam,
                                               direction, weights=weights)
            values, done = _load_checkpoint(saved, stamp, len(layers), math.prod(shape))
            chunks = _chunks(fam, shape, batch, max_sites, p_first, call_cost, layers,
                             model.cfg.n_layers)
            unpatched = torch.ones_like(done)  # sites no chunk covers: positions before p_first
            for sites, _ in chunks:
                unpatched[:, sites] = False
            done |= unpatched
            bar.update(int(done.sum()))
            for sites, p0 in chunks:
                todo = [layer for row, layer in enumerate(layers) if not done[row, sites].all()]
                for wave in _waves(todo, len(sites), max_sites):
                    patched = _run_wave(model, fam, run, source_cache, wave, sites, shape, p0)
                    rows = [layers.index(layer) for layer in wave]
                    for k, row in enumerate(rows):
                        values[row, sites] = (patched[k] - run.baseline_rows).mean(1).float().cpu()
                        done[row, sites] = True
                    bar.update(len(wave) * len(sites))
                    if saved is not None:
                        _save_checkpoint(saved, values, done, stamp)
            results[fam.name] = Scores(
                family=fam.name, method="exact", values=values.view(len(layers), *shape),
                dims=fam.dims, labels=default_labels(model, fam, target, shape),
                baseline=run.baseline_rows.mean().item(),
            )
        bar.close()
    return results


class _TargetRun(NamedTuple):
    """The unpatched target run, which every patched run starts from and is compared with."""

    starts: list[Float[Tensor, "batch pos d_model"]]
    """The residual stream entering each layer, and the final one last."""
    kv: list[TransformerLensKeyValueCacheEntry]
    """Each layer's keys and values as TransformerLens caches them (frozen)."""
    end: Int[Tensor, " batch"]
    """Each prompt's prediction position."""
    metric: Metric
    baseline_rows: Float[Tensor, " batch"]
    """The metric of each prompt's unpatched target run."""
    logits: Float[Tensor, "batch pos vocab"] | None
    """The target run's full logits, kept only for metrics that read every position."""


def _target_run(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], metric: Metric) -> _TargetRun:
    """Run the target block by block, keeping what patched runs start from and compare with."""
    batch, n_pos = tokens.shape
    x = model(tokens, stop_at_layer=0)  # embeddings (and position embeddings) only
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch).entries
    if model.cfg.n_key_value_heads is not None and model.cfg.ungroup_grouped_query_attention:
        for entry in kv:  # ungrouped (sites.site_config): keys and values per query head
            empty = entry.past_keys.new_empty(batch, 0, model.cfg.n_heads, model.cfg.d_head)
            entry.past_keys, entry.past_values = empty, empty.clone()
    starts = [x]
    for block, entry in zip(model.blocks, kv):
        x = block(x, past_kv_cache_entry=entry)
        starts.append(x)
    for entry in kv:
        entry.frozen = True
    end = metric.positions(n_pos).to(x.device)
    if metric.reads_all_positions:
        logits = final_logits(model, x)
        return _TargetRun(starts, kv, end, metric, metric(logits), logits)
    final = x[torch.arange(batch, device=x.device), end]
    return _TargetRun(starts, kv, end, metric, metric.from_final_resid(model, final), None)


def _first_difference(target: Int[Tensor, "batch pos"], source: Int[Tensor, "batch pos"]) -> int:
    """The first position where the target and source tokens differ in some prompt.

    Before it both runs see the same tokens, so (with causal attention) every activation there
    is the same in both and patching it changes nothing. At most `pos - 1`, so that there is
    always something to run."""
    differs = (target != source).any(0).nonzero()
    return int(differs[0]) if len(differs) else target.shape[1] - 1


def _run_wave(
    model: HookedTransformer,
    fam: SiteFamily,
    run: _TargetRun,
    source_cache: ActivationCache,
    wave: list[int],
    sites: Int[Tensor, " sites"],
    shape: tuple[int, ...],
    p0: int,
) -> Float[Tensor, "wave sites batch"]:
    """The metric of the target run with each site of `sites` patched at each layer of `wave`.

    A wave runs layers `wave[0]..` once: the patched runs of layer L (`sites x batch` rows, a
    copy of the target's residual stream entering L) join the batch at block L, and block L's
    hook patches those rows only. Rows of earlier layers of the wave are already running, so
    the batch grows layer by layer and no row runs a block it does not need. Only positions
    `p0..` run; the target's keys and values of earlier positions come from its KV cache.
    """
    batch = run.end.shape[0]
    n = len(sites)
    mask = _site_mask(fam, sites, shape, source_cache[fam.hook_name(wave[0])].shape[1:])
    if mask.shape[2] > 1:  # the position axis, unless the mask broadcasts over it
        mask = mask[:, :, p0:]
    mask = mask.to(run.end.device)

    def patch_hook(act: Tensor, hook: HookPoint, src: Tensor) -> Tensor:
        new = act[-n * batch:].view(n, batch, *act.shape[1:])  # the rows that joined here
        new = torch.where(mask, src.unsqueeze(0), new).flatten(0, 1)
        return torch.cat([act[: -n * batch], new])

    hooks = [(fam.hook_name(layer), partial(patch_hook, src=source_cache[fam.hook_name(layer)][:, p0:]))
             for layer in wave]
    x: Tensor | None = None
    with model.hooks(fwd_hooks=hooks):
        for layer in range(wave[0], model.cfg.n_layers):
            if layer in wave:
                joining = einops.repeat(run.starts[layer][:, p0:], "b p d -> (s b) p d", s=n)
                x = joining if x is None else torch.cat([x, joining])
            assert x is not None  # wave[0] is the first layer
            past = None
            if p0 > 0:
                copies = x.shape[0] // batch
                entry = run.kv[layer]
                past = TransformerLensKeyValueCacheEntry(
                    past_keys=entry.past_keys[:, :p0].repeat(copies, 1, 1, 1),
                    past_values=entry.past_values[:, :p0].repeat(copies, 1, 1, 1),
                    frozen=True,
                )
            x = model.blocks[layer](x, past_kv_cache_entry=past)
    patched = _patched_metric(model, x, run, p0, len(wave) * n)
    return patched.view(len(wave), n, batch)


def _patched_metric(
    model: HookedTransformer,
    out: Float[Tensor, "rows pos d_model"],
    run: _TargetRun,
    p0: int,
    copies: int,
) -> Float[Tensor, "copies batch"]:
    """The metric of each patched row. A prompt whose prediction position lies before `p0`
    cannot be affected by patches at `p0..` (causal attention): it keeps its baseline.

    A metric that reads every position gets full logits: the patched rows' at `p0..`, the
    target's before `p0` (which the patches cannot change), one copy of the batch at a time."""
    batch = run.end.shape[0]
    if run.logits is not None:
        prefix = run.logits[:, :p0]
        values = [run.metric(torch.cat([prefix, final_logits(model, out[c * batch:(c + 1) * batch])], 1))
                  for c in range(copies)]
        return torch.stack(values)
    rel = (run.end - p0).clamp(min=0).repeat(copies)
    final = out[torch.arange(out.shape[0], device=out.device), rel]
    patched = run.metric.from_final_resid(model, final)
    patched = patched.view(copies, batch)
    return torch.where((run.end >= p0).unsqueeze(0), patched, run.baseline_rows.unsqueeze(0))


def _chunks(
    fam: SiteFamily, shape: tuple[int, ...], batch: int, max_sites: int, p_first: int | None,
    call_cost: float, layers: list[int], n_layers: int,
) -> list[tuple[Tensor, int]]:
    """The sites of one layer in chunks, each with the first position `p0` it must compute.

    Every layer of the family uses the same chunks. With `p_first` None (`skip_prefix` off)
    or without a position axis, every chunk starts at `p_first` (where the two token batches
    first differ; 0 when None) and chunks are as large as memory allows. With a position axis, positions before `p_first` get no chunk (their
    effect is exactly zero), the others are grouped into consecutive runs (site order is
    position-major), and the grouping minimises `block calls * call_cost + sum(rows *
    positions)` over all layers by dynamic programming: small groups skip more positions,
    large groups make fewer calls.
    """
    n_sites = math.prod(shape)
    if p_first is None or fam.axes[0] != "pos":
        return [(torch.arange(lo, min(lo + max_sites, n_sites)), p_first or 0)
                for lo in range(0, n_sites, max_sites)]
    n_pos, per_pos = shape[0], n_sites // shape[0]
    blocks_per_site = sum(n_layers - layer for layer in layers)
    # best[i]: the cheapest cost of positions i.. ; choice[i]: where the group starting at i ends.
    best = [0.0] * (n_pos + 1)
    choice = [n_pos] * (n_pos + 1)
    for i in range(n_pos - 1, p_first - 1, -1):
        best[i] = math.inf
        for j in range(i + 1, n_pos + 1):
            sites = (j - i) * per_pos
            calls = _block_calls(layers, sites, max_sites, n_layers)
            cost = calls * call_cost + sites * batch * (n_pos - i) * blocks_per_site + best[j]
            if cost < best[i]:
                best[i], choice[i] = cost, j
    chunks, i = [], p_first
    while i < n_pos:
        sites = torch.arange(i * per_pos, choice[i] * per_pos)
        chunks += [(sites[lo:lo + max_sites], i) for lo in range(0, len(sites), max_sites)]
        i = choice[i]
    return chunks


def _waves(layers: list[int], n_sites: int, max_sites: int) -> list[list[int]]:
    """Layers, in order, whose patched runs of `n_sites` sites share one pass (`_run_wave`),
    as many as keep the rows of the last block call within `max_sites` sites."""
    layers, per_wave = sorted(layers), max(1, max_sites // n_sites)
    return [layers[k:k + per_wave] for k in range(0, len(layers), per_wave)]


def _block_calls(layers: list[int], n_sites: int, max_sites: int, n_layers: int) -> int:
    """How many block calls the waves of `n_sites` sites (in chunks of `max_sites`) make."""
    def calls(size: int) -> int:
        return sum(n_layers - wave[0] for wave in _waves(layers, size, max_sites)) if size else 0

    full, rest = divmod(n_sites, max_sites)
    return full * calls(max_sites) + calls(rest)


class StaleCheckpointError(ValueError):
    """A checkpoint file was made with other settings than the call that would resume it."""


#: Config fields that change a model's outputs without changing its parameters' names, shapes or
#: values (sizes are covered by the parameter shapes in `weights_digest`).
FINGERPRINT_CONFIG_FIELDS = (
    "model_name", "dtype", "act_fn", "normalization_type", "positional_embedding_type",
    "rotary_dim", "rotary_base", "rotary_adjacent_pairs", "use_NTK_by_parts_rope",
    "NTK_by_parts_factor", "eps", "use_attn_scale", "attn_scale", "use_qk_norm",
    "attn_scores_soft_cap", "output_logits_soft_cap", "use_local_attn", "window_size",
    "attn_types", "original_architecture", "gated_mlp", "final_rms", "parallel_attn_mlp",
    "attention_dir", "use_normalization_before_and_after", "post_embedding_ln",
)


def weights_digest(model: HookedTransformer) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes (in `named_parameters` order).

    Exact (any changed weight changes it) and independent of memory layout (each tensor is
    hashed in its contiguous form, so `layout.inference_layout` does not change it). Cost: one
    SHA-256 pass over the weights, a second or two per GB on a CPU (plus the copy to the CPU
    for a model on an accelerator), small beside the patched runs a checkpoint is for;
    `exact_patching` computes it once per call, and only when given a checkpoint. (A sum of
    the weights would be cheaper but misses edits that keep it, e.g. permuted neurons.)
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = param.detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _digest_value(value: object) -> str:
    """A short stable digest of a tensor (dtype, shape, bytes) or of another value's repr."""
    digest = hashlib.sha256()
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    else:
        digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def checkpoint_fingerprint(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    fam: SiteFamily,
    direction: Direction,
    weights: str | None = None,
) -> dict[str, str]:
    """What the values in a checkpoint of `exact_patching` depend on, field by field.

    Fields: `model` (its config's `model_name`), `weights` (`weights_digest`), `config` (the
    `FINGERPRINT_CONFIG_FIELDS` of `model.cfg`), `clean_tokens`, `corrupt_tokens` (their
    bytes), `metric` (its class and each field, or its `fingerprint_parts()` where it has them:
    tensors by their bytes, other values by repr),
    `direction`, `family` (the `SiteFamily`: hook, axes, layers). Values are short hex digests
    or plain strings; a mismatch is reported per field.

    Args:
        weights: a precomputed `weights_digest(model)` (it is the expensive part).
    """
    cfg = model.cfg
    config = {k: repr(getattr(cfg, k, None)) for k in FINGERPRINT_CONFIG_FIELDS}
    if hasattr(metric, "fingerprint_parts"):
        parts = metric.fingerprint_parts()
    elif dataclasses.is_dataclass(metric):
        parts = {f.name: getattr(metric, f.name) for f in dataclasses.fields(metric)}
    else:
        parts = dict(vars(metric)) if hasattr(metric, "__dict__") else {"repr": repr(metric)}
    metric_digest = _digest_value(
        [type(metric).__qualname__] + [(k, _digest_value(v)) for k, v in sorted(parts.items())])
    return {
        "model": str(cfg.model_name),
        "weights": weights if weights is not None else weights_digest(model),
        "config": _digest_value(sorted(config.items())),
        "clean_tokens": _digest_value(clean_tokens.long()),
        "corrupt_tokens": _digest_value(corrupt_tokens.long()),
        "metric": f"{type(metric).__name__}:{metric_digest}",
        "direction": str(direction),
        "family": _digest_value(dataclasses.astuple(fam)),
    }


def _load_checkpoint(
    saved: Path | None, stamp: dict[str, str] | None, n_layers: int, n_sites: int
) -> tuple[Tensor, Tensor]:
    """`values [layer, site]` and which of them are `done`, from a checkpoint if there is one
    whose fingerprint equals `stamp` (a `StaleCheckpointError` otherwise)."""
    values = torch.zeros(n_layers, n_sites)
    done = torch.zeros(n_layers, n_sites, dtype=torch.bool)
    if saved is None or not saved.exists():
        return values, done
    state = torch.load(saved)
    how = (f"Delete {saved} (or its directory) to start afresh, or pass another `checkpoint` "
           "directory for these settings.")
    found = state.get("fingerprint")
    if found is None:
        raise StaleCheckpointError(
            f"checkpoint {saved} has no fingerprint (written by an older version of interp), so "
            f"nothing says it was made with this model, tokens, metric and direction. {how}"
        )
    differ = [k for k in sorted({*found, *stamp}) if found.get(k) != stamp.get(k)]
    if differ:
        detail = "; ".join(f"{k}: saved {found.get(k)!r}, now {stamp.get(k)!r}" for k in differ)
        raise StaleCheckpointError(
            f"checkpoint {saved} was made with other settings ({', '.join(differ)} differ: "
            f"{detail}). {how}"
        )
    return state["values"], state["done"]


def _save_checkpoint(saved: Path, values: Tensor, done: Tensor, stamp: dict[str, str]) -> None:
    saved.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"values": values, "done": done, "fingerprint": stamp}, saved.with_suffix(".tmp"))
    saved.with_suffix(".tmp").replace(saved)


def _site_mask(
    fam: SiteFamily, sites: Tensor, shape: tuple[int, ...], act_shape: torch.Size
) -> Tensor:
    """Boolean `[n_sites, 1, *act_shape]` (broadcast over batch): True where site s is patched.

    Axes of the activation that are not site axes (d_model, d_head, and pos for `heads`) are
    broadcast, so a site covers its whole vector (and all positions where it has no pos axis).
    """
    act_axes = fam.act_axes[1:]
    mask_shape = [len(sites), 1] + [
        act_shape[i] if a in fam.axes or (a == "neuron" and "neuron" in fam.axes) else 1
        for i, a in enumerate(act_axes)
    ]
    mask = torch.zeros(mask_shape, dtype=torch.bool)
    coords = torch.unravel_index(sites, shape) if len(shape) > 1 else (sites,)
    index: list[Tensor] = [torch.arange(len(sites)), torch.zeros(len(sites), dtype=torch.long)]
    for a in act_axes:
        if a in fam.axes:
            index.append(coords[fam.axes.index(a)])
        else:
            index.append(torch.zeros(len(sites), dtype=torch.long))
    mask[tuple(index)] = True
    return mask


def _sites_per_chunk(model: HookedTransformer, n_pos: int, batch: int, memory_gb: float) -> int:
    """How many sites (each `batch` rows) fit one chunk: a rough count of the activations one
    block keeps alive per row (residual, MLP hidden, q/k/v/z, attention scores and pattern)."""
    cfg = model.cfg
    per_row = n_pos * (6 * cfg.d_model + 3 * cfg.d_mlp + 4 * cfg.n_heads * cfg.d_head)
    per_row += 3 * cfg.n_heads * n_pos * n_pos
    bytes_per = torch.finfo(cfg.dtype).bits // 8
    rows = int(memory_gb * 2**30 / (per_row * bytes_per))
    return max(1, rows // batch)
