"""Writing a study's `results.json`: its numbers plus what is needed to reproduce them."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Versions of the stack, the device, and the git commit of the working tree (if any)."""
    versions = {}
    for dist in ("interp", "torch", "transformer-lens", "transformers", "sae-lens"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def write_results(out_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write `results` (plus an `environment` block) to `out_dir/results.json`; return the path.

    Tensors, dataclasses, paths and dtypes are converted to plain JSON.
    """
    path = Path(out_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(_jsonable(results), environment=environment())
    path.write_text(json.dumps(payload, indent=2))
    return path
