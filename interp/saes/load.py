"""Load sparse autoencoders: pretrained ones by SAELens release and id, local ones from disk.

SAELens 6 does the loading (`SAE.from_pretrained`, `SAE.load_from_disk`); this module adds what
an offline machine needs around it:

- **fast failure offline.** SAELens's directory of pretrained releases ships inside the package,
  so an unknown release or id is reported at once, with close matches, and without the network.
  A known release is then looked up in the local Hugging Face cache; only when it is not there is
  the Hub probed, with `interp.models.check_hub` (a TCP connect and one metadata request, each
  with a short timeout), so an unreachable Hub gives `HubUnreachableError` within seconds instead
  of a hang inside `hf_hub_download`;
- **local directories** written by `SAE.save_model` / `TrainingSAE.save_inference_model` (and so
  by `interp.saes.train.train_sae`): `cfg.json` plus `sae_weights.safetensors`. A missing path
  or file gives `SAENotFoundError` naming what is missing and which SAEs are saved locally.

`saes_dir()` is where `interp` keeps its own trained SAEs: `<interp cache>/saes`
(`$INTERP_CACHE_DIR`, default `~/.cache/interp`).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from sae_lens import SAE

from interp import models
from interp.models import HubUnreachableError

__all__ = [
    "SAELoadError",
    "SAENotFoundError",
    "HubUnreachableError",
    "saes_dir",
    "list_local",
    "load_local",
    "load_pretrained",
    "load_sae",
]

#: The files of an SAELens SAE directory.
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


class SAELoadError(RuntimeError):
    """Base class for SAE-loading errors whose message says what to do."""


class SAENotFoundError(SAELoadError, FileNotFoundError):
    """A local SAE directory, a pretrained release or an id within it does not exist."""


def saes_dir() -> Path:
    """Where `interp` saves the SAEs it trains: `<interp cache>/saes` (created)."""
    path = models.cache_dir() / "saes"
    path.mkdir(parents=True, exist_ok=True)
    return path


def list_local(root: str | Path | None = None) -> list[Path]:
    """SAE directories (holding `cfg.json` and `sae_weights.safetensors`) under `root`
    (default `saes_dir()`), sorted."""
    root = Path(root) if root is not None else saes_dir()
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.rglob(CFG_FILENAME) if (p.parent / WEIGHTS_FILENAME).exists())


def load_local(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> SAE:
    """An SAE saved on disk by SAELens (`save_model` / `save_inference_model`).

    Args:
        path: the SAE's directory.
        device: where to put it.
        dtype: "float32", "bfloat16", ...; default the dtype in its `cfg.json`.

    Raises:
        SAENotFoundError: the directory or one of its two files is missing; the message lists
            the SAEs saved under `saes_dir()`.
    """
    path = Path(path).expanduser()
    missing = [name for name in (CFG_FILENAME, WEIGHTS_FILENAME) if not (path / name).is_file()]
    if not path.is_dir() or missing:
        what = "does not exist" if not path.exists() else (
            "is not a directory" if not path.is_dir() else f"lacks {' and '.join(missing)}")
        saved = list_local()
        listing = "\n  ".join(str(p) for p in saved[:20]) or "(none yet)"
        raise SAENotFoundError(
            f"No SAE at {path}: it {what}. An SAE directory holds {CFG_FILENAME} and "
            f"{WEIGHTS_FILENAME} (written by SAE.save_model or interp.saes.train_sae). "
            f"SAEs saved under {saes_dir()}:\n  {listing}\n"
            "For a pretrained SAE use load_pretrained(release, sae_id)."
        )
    return SAE.load_from_disk(path, device=str(device), dtype=dtype)


def load_pretrained(
    release: str,
    sae_id: str,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    timeout: float = models.HUB_TIMEOUT_S,
) -> SAE:
    """A pretrained SAE by SAELens release and id (e.g. `"gpt2-small-res-jb"`,
    `"blocks.8.hook_resid_pre"`), from the local Hugging Face cache or the Hub.

    A release that is not in SAELens's directory but looks like a Hub repo id (`org/name`) is
    passed on to SAELens as such (`sae_id` is then the folder inside the repo).

    Raises:
        SAENotFoundError: unknown release or id (with close matches), checked offline.
        HubUnreachableError: the SAE is not cached and the Hub does not answer within `timeout`
            seconds (or `HF_HUB_OFFLINE` is set).
    """
    from sae_lens.loading.pretrained_saes_directory import (
        get_pretrained_saes_directory,
        get_repo_id_and_folder_name,
    )

    directory = get_pretrained_saes_directory()
    if release in directory:
        saes_map = directory[release].saes_map
        if sae_id not in saes_map:
            close = difflib.get_close_matches(sae_id, list(saes_map), n=5, cutoff=0.5)
            some = close or list(saes_map)[:5]
            raise SAENotFoundError(
                f"SAELens release {release!r} has no SAE with id {sae_id!r}. "
                f"{'Close matches' if close else 'Some of its ids'}: {', '.join(some)} "
                f"({len(saes_map)} ids in all)."
            )
        repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    elif "/" in release:
        repo_id, folder = release, sae_id
    else:
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.5)
        raise SAENotFoundError(
            f"Unknown SAELens release {release!r}"
            + (f"; close matches: {', '.join(close)}" if close else "")
            + f". {len(directory)} releases are known (sae_lens.loading.pretrained_saes_directory"
            ".get_pretrained_saes_directory()); a Hub repo id 'org/name' is also accepted. "
            "For an SAE on disk use load_local(path)."
        )
    if not _in_hf_cache(repo_id, folder):
        try:
            models.check_hub(repo_id, timeout=timeout)
        except HubUnreachableError as exc:
            raise HubUnreachableError(
                f"Cannot load the pretrained SAE {release!r} / {sae_id!r} (Hub repo {repo_id}, "
                f"folder {folder!r}): it is not in the local Hugging Face cache and the Hub "
                f"cannot be reached ({exc}). Offline, load an SAE from disk with "
                "interp.saes.load_local(path) or train one with interp.saes.train_sae."
            ) from exc
        except models.UnknownModelError as exc:
            raise SAENotFoundError(f"The Hub has no repository {repo_id!r} for SAE {release!r}.") from exc
    return SAE.from_pretrained(release, sae_id, device=str(device), dtype=dtype)


def load_sae(source: str | Path, sae_id: str | None = None, device: str | torch.device = "cpu",
             dtype: str | None = None) -> SAE:
    """`load_pretrained(source, sae_id)` when `sae_id` is given, else `load_local(source)`."""
    if sae_id is not None:
        return load_pretrained(str(source), sae_id, device=device, dtype=dtype or "float32")
    return load_local(source, device=device, dtype=dtype)


def _in_hf_cache(repo_id: str, folder: str) -> bool:
    """Whether some cached snapshot of `repo_id` holds `folder` (so no Hub call is needed)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        return False
    cache = Path(os.environ.get("HF_HUB_CACHE", HF_HUB_CACHE))
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return False
    return any((snap / folder).exists() for snap in snapshots.iterdir())
