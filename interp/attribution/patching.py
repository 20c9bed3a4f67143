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
- only the logits the metric reads are computed (`metrics.final_columns`): the final norm at the
  last position and a few unembedding columns, not the whole vocabulary at every position;
- a patch at position p cannot change positions before p (causal attention), so patches of a
  family with a position axis run on positions p.. only, reading the target run's keys and
  values of earlier positions from a KV cache (TransformerLens's own cache entries);
- rows are chunked so that one chunk's activations stay under `memory_gb`.

Prompts of different lengths can share a batch: right-pad them and give the metric each
prompt's `end_pos`. With causal attention the padding never reaches a prompt's prediction.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from interp.attribution.metrics import LogitDiff, final_columns
from interp.attribution.sites import Scores, SiteFamily, default_labels, families

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


def check_pairs(clean_tokens: Tensor, corrupt_tokens: Tensor, metric: LogitDiff) -> None:
    """Shapes line up: same [batch, pos] for clean and corrupt, one answer per prompt."""
    if clean_tokens.ndim != 2 or clean_tokens.shape != corrupt_tokens.shape:
        raise ValueError(
            f"clean and corrupt tokens must both be [batch, pos] of the same shape; got clean "
            f"{tuple(clean_tokens.shape)} and corrupt {tuple(corrupt_tokens.shape)}"
        )
    if metric.columns.shape[0] != clean_tokens.shape[0]:
        raise ValueError(
            f"the metric has answers for {metric.columns.shape[0]} prompts but the batch has "
            f"{clean_tokens.shape[0]}"
        )


def exact_patching(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: LogitDiff,
    site_families: str | SiteFamily | Sequence[str | SiteFamily] = ("resid", "attn", "mlp", "heads"),
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
        metric: reads a few logit columns at each prompt's prediction position (`LogitDiff`).
        site_families: names from `sites.FAMILIES`, or `SiteFamily` objects (e.g. SAE latents).
        direction: `"denoise"` (clean into corrupt, default) or `"noise"`.
        memory_gb: rough bound on the activations of one chunk of patched runs.
        progress: show a progress bar.
        skip_prefix: for families with a position axis, run a chunk whose patches start at
            position `p0` on positions `p0..` only, with the target run's keys and values of
            positions `< p0` (which no such patch can change) supplied as a KV cache.
        call_cost: the fixed cost of one block call in units of (row x position) of work, used
            to decide how positions are grouped into chunks (TransformerLens copies some
            weight matrices on every call, so many tiny chunks are slower than a few larger
            ones; on a 2-core CPU one call costs about as much as 64-100 row-positions).
        checkpoint: a directory; each family's finished layers are saved there as they are
            done (`<family>.pt`) and skipped when the same call runs again, so an interrupted
            run loses at most one layer of work. The caller keeps one directory per setting
            (model, tokens, metric, direction): nothing here checks that they match.
    """
    check_pairs(clean_tokens, corrupt_tokens, metric)
    target, source = targets(clean_tokens, corrupt_tokens, direction)
    device = model.cfg.device
    target, source = target.to(device), source.to(device)
    fams = families(site_families)
    n_layers = model.cfg.n_layers
    batch, n_pos = target.shape
    columns = metric.columns.to(device)
    end = metric.positions(n_pos).to(device)
    with torch.no_grad():
        starts, kv = _target_run(model, target)
        final = starts[n_layers][torch.arange(batch, device=device), end]
        baseline_rows = metric.from_columns(final_columns(model, final, columns))
        names = {f.hook_name(layer) for f in fams for layer in f.layer_list(model)}
        _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
    baseline = baseline_rows.mean().item()

    max_sites = _sites_per_chunk(model, n_pos, batch, memory_gb)
    shapes = {f.name: f.site_shape(source_cache[f.hook_name(f.layer_list(model)[0])].shape) for f in fams}
    bar = tqdm(total=sum(math.prod(shapes[f.name]) * len(f.layer_list(model)) for f in fams),
               desc="exact patching", disable=not progress, unit="site")
    results = {}
    for fam in fams:
        shape, layers = shapes[fam.name], fam.layer_list(model)
        values = torch.zeros(len(layers), math.prod(shape))
        done: list[int] = []
        saved = Path(checkpoint) / f"{fam.name}.pt" if checkpoint is not None else None
        if saved is not None and saved.exists():
            state = torch.load(saved)
            values, done = state["values"], state["done_layers"]
            bar.update(len(done) * values.shape[1])
        chunks = _chunks(fam, shape, batch, max_sites, skip_prefix, call_cost)
        for row, layer in enumerate(layers):
            if layer in done:
                continue
            src = source_cache[fam.hook_name(layer)]
            for sites, p0 in chunks:
                n = len(sites)
                mask = _site_mask(fam, sites, shape, src.shape[1:])[:, :, p0:].to(device)
                src_tail = src[:, p0:]

                def patch_hook(act, hook, mask=mask, src=src_tail, n=n):
                    act = act.view(n, batch, *act.shape[1:])
                    return torch.where(mask, src.unsqueeze(0), act).flatten(0, 1)

                resid = einops.repeat(starts[layer][:, p0:], "b p d -> (s b) p d", s=n)
                with torch.no_grad(), model.hooks(fwd_hooks=[(fam.hook_name(layer), patch_hook)]):
                    out = _run_blocks(model, layer, resid, kv, p0, n)
                    patched = _patched_metric(model, metric, out, end, p0, columns, baseline_rows, n)
                values[row, sites] = (patched - baseline_rows).mean(1).float().cpu()
                bar.update(n)
            if saved is not None:
                done.append(layer)
                saved.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"values": values, "done_layers": done}, saved.with_suffix(".tmp"))
                saved.with_suffix(".tmp").replace(saved)
        results[fam.name] = Scores(
            family=fam.name, method="exact", values=values.view(len(layers), *shape),
            dims=fam.dims, labels=default_labels(model, fam, target, shape), baseline=baseline,
        )
    bar.close()
    return results


def _target_run(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
) -> tuple[list[Tensor], list[TransformerLensKeyValueCacheEntry]]:
    """The target run block by block: the residual stream entering each layer (and the final
    one, last) and each layer's keys and values as TransformerLens caches them."""
    x = model(tokens, stop_at_layer=0)  # embeddings (and position embeddings) only
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0]).entries
    starts = [x]
    for block, entry in zip(model.blocks, kv):
        x = block(x, past_kv_cache_entry=entry)
        starts.append(x)
    for entry in kv:
        entry.frozen = True
    return starts, kv


def _run_blocks(
    model: HookedTransformer,
    layer: int,
    x: Float[Tensor, "rows pos d_model"],
    kv: list[TransformerLensKeyValueCacheEntry],
    p0: int,
    copies: int,
) -> Float[Tensor, "rows pos d_model"]:
    """Blocks `layer..` on positions `p0..` of `copies` stacked target batches, the target's
    keys and values of positions `< p0` given as a frozen KV cache."""
    for block, entry in zip(model.blocks[layer:], kv[layer:]):
        past = None
        if p0 > 0:
            past = TransformerLensKeyValueCacheEntry(
                past_keys=entry.past_keys[:, :p0].repeat(copies, 1, 1, 1),
                past_values=entry.past_values[:, :p0].repeat(copies, 1, 1, 1),
                frozen=True,
            )
        x = block(x, past_kv_cache_entry=past)
    return x


def _patched_metric(
    model: HookedTransformer,
    metric: LogitDiff,
    out: Float[Tensor, "rows pos d_model"],
    end: Int[Tensor, " batch"],
    p0: int,
    columns: Int[Tensor, "batch k"],
    baseline_rows: Float[Tensor, " batch"],
    copies: int,
) -> Float[Tensor, "copies batch"]:
    """The metric of each patched row. A prompt whose prediction position lies before `p0`
    cannot be affected by patches at `p0..` (causal attention): it keeps its baseline."""
    batch = end.shape[0]
    rel = (end - p0).clamp(min=0).repeat(copies)
    final = out[torch.arange(out.shape[0], device=out.device), rel]
    patched = metric.from_columns(final_columns(model, final, columns.repeat(copies, 1)))
    patched = patched.view(copies, batch)
    return torch.where((end >= p0).unsqueeze(0), patched, baseline_rows.unsqueeze(0))


def _chunks(
    fam: SiteFamily, shape: tuple[int, ...], batch: int, max_sites: int, skip_prefix: bool,
    call_cost: float,
) -> list[tuple[Tensor, int]]:
    """Sites of one layer in chunks, each with the first position `p0` it must compute.

    Without a position axis (or with `skip_prefix` off) every chunk starts at 0 and chunks are
    as large as memory allows. With a position axis, sites are grouped by position (site order
    is position-major), and the grouping minimises `calls * call_cost + sum(rows * positions)`
    over consecutive groups by dynamic programming: small groups skip more positions, large
    groups make fewer calls.
    """
    n_sites = math.prod(shape)
    if not skip_prefix or fam.axes[0] != "pos":
        return [(torch.arange(lo, min(lo + max_sites, n_sites)), 0)
                for lo in range(0, n_sites, max_sites)]
    n_pos, per_pos = shape[0], n_sites // shape[0]
    # best[i]: the cheapest cost of positions i.. ; choice[i]: where the group starting at i ends.
    best = [0.0] * (n_pos + 1)
    choice = [n_pos] * (n_pos + 1)
    for i in range(n_pos - 1, -1, -1):
        best[i] = math.inf
        for j in range(i + 1, n_pos + 1):
            sites = (j - i) * per_pos
            cost = math.ceil(sites / max_sites) * call_cost + sites * batch * (n_pos - i) + best[j]
            if cost < best[i]:
                best[i], choice[i] = cost, j
    chunks, i = [], 0
    while i < n_pos:
        sites = torch.arange(i * per_pos, choice[i] * per_pos)
        chunks += [(sites[lo:lo + max_sites], i) for lo in range(0, len(sites), max_sites)]
        i = choice[i]
    return chunks


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
    for i, a in enumerate(act_axes):
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
