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
- rows are chunked so that one chunk's activations stay under `memory_gb`.

Caveat: prompts in a batch must have the same length (no padding), as in TL's `patching.py`.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import einops
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from interp.attribution.metrics import LogitDiff, final_columns
from interp.attribution.sites import Scores, SiteFamily, axis_sizes, default_labels, families

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
    site_families: str | Sequence[str] = ("resid", "attn", "mlp", "heads"),
    direction: Direction = "denoise",
    memory_gb: float = 2.0,
    progress: bool = True,
) -> dict[str, Scores]:
    """Patch every site of each family, batched; return `Scores` per family (method `exact`).

    Args:
        model: any HookedTransformer.
        clean_tokens, corrupt_tokens: `[batch, pos]`, same shape.
        metric: reads a few logit columns at the last position (`LogitDiff`, normalised or not).
        site_families: names from `sites.FAMILIES`.
        direction: `"denoise"` (clean into corrupt, default) or `"noise"`.
        memory_gb: rough bound on the activations of one chunk of patched runs.
        progress: show a progress bar.
    """
    check_pairs(clean_tokens, corrupt_tokens, metric)
    target, source = targets(clean_tokens, corrupt_tokens, direction)
    device = model.cfg.device
    target, source = target.to(device), source.to(device)
    fams = families(site_families)
    n_layers = model.cfg.n_layers
    columns = metric.columns.to(device)
    with torch.no_grad():
        _, target_cache = model.run_with_cache(
            target, names_filter=lambda n: n.endswith("hook_resid_pre")
        )
        _, source_cache = model.run_with_cache(
            source, names_filter=lambda n: any(n.endswith(f.hook.split("}", 1)[1]) for f in fams)
        )
        final = _run_from(model, 0, target)[:, -1]
        baseline_rows = metric.from_columns(final_columns(model, final, columns))
    baseline = baseline_rows.mean().item()

    sizes = axis_sizes(model, target.shape[1])
    batch = target.shape[0]
    per_site_rows = _sites_per_chunk(model, target.shape[1], batch, memory_gb)
    bar = tqdm(total=sum(math.prod(sizes[a] for a in f.axes) for f in fams) * n_layers,
               desc="exact patching", disable=not progress, unit="site")
    results = {}
    for fam in fams:
        shape = tuple(sizes[a] for a in fam.axes)
        values = torch.zeros(n_layers, math.prod(shape))
        for layer in range(n_layers):
            start = target_cache[f"blocks.{layer}.hook_resid_pre"]
            src = source_cache[fam.hook_name(layer)]
            for lo in range(0, values.shape[1], per_site_rows):
                sites = torch.arange(lo, min(lo + per_site_rows, values.shape[1]))
                mask = _site_mask(fam, sites, shape, src.shape[1:]).to(device)
                n = len(sites)

                def patch_hook(act, hook, mask=mask, src=src, n=n):
                    act = act.view(n, batch, *act.shape[1:])
                    return torch.where(mask, src.unsqueeze(0), act).flatten(0, 1)

                resid = einops.repeat(start, "b p d -> (s b) p d", s=n)
                with torch.no_grad(), model.hooks(fwd_hooks=[(fam.hook_name(layer), patch_hook)]):
                    final = _run_from(model, layer, resid)[:, -1]
                    cols = final_columns(model, final, columns.repeat(n, 1))
                patched = metric.from_columns(cols).view(n, batch)
                values[layer, sites] = (patched - baseline_rows).mean(1).float().cpu()
                bar.update(n)
        results[fam.name] = Scores(
            family=fam.name, method="exact", values=values.view(n_layers, *shape),
            dims=fam.dims, labels=default_labels(model, fam, target), baseline=baseline,
        )
    bar.close()
    return results


def _run_from(model: HookedTransformer, layer: int, x: Tensor) -> Tensor:
    """The final residual stream from tokens (`layer == 0` and integer `x`) or from the
    residual stream entering `layer`."""
    if not x.is_floating_point():
        return model(x, stop_at_layer=model.cfg.n_layers)  # embeddings + every block
    for block in model.blocks[layer:]:
        x = block(x)
    return x


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
