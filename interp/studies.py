"""The registry of studies that `interp run <study>` runs.

A study is a module under `experiments/` (or in any other installed package) registered under
the entry-point group `interp.studies` in its `pyproject.toml`:

    [project.entry-points."interp.studies"]
    demo = "experiments.demo"

The library finds studies through that group and never imports `experiments` itself. A study
module defines

- `DESCRIPTION: str`, one line for `interp run --help`;
- `add_arguments(parser)` (optional): its own command-line options;
- `run(config: StudyConfig, **options) -> dict`: does the work, writes
  `config.out_dir(<study>)`, returns the results it wrote to `results.json`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from interp.models import DEFAULT_MODEL

ENTRY_POINT_GROUP = "interp.studies"


@dataclass
class StudyConfig:
    """What every study takes.

    Attributes:
        model: a name `interp.models.load` accepts.
        device: "cpu", "cuda", ...; None picks CUDA when available.
        dtype: "float32" (default), "bfloat16" or "float16".
        out: the results root; a study writes to `out/<study>/<model>/`.
        seed: seeds torch (and anything else random) before the study runs.
    """

    model: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str | None = None
    out: Path = field(default_factory=lambda: Path("results"))
    seed: int = 0

    def out_dir(self, study: str) -> Path:
        """`out/<study>/<model>/`, created; a model path is reduced to its file or folder name."""
        model_tag = Path(self.model).name if ("/" in self.model and Path(self.model).exists()) else self.model
        path = Path(self.out) / study / model_tag.replace("/", "__")
        path.mkdir(parents=True, exist_ok=True)
        return path


def available() -> dict[str, str]:
    """Study name -> module path, from the installed entry points."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.value for ep in sorted(eps, key=lambda e: e.name)}


def get(name: str) -> ModuleType:
    """The module of study `name`; a clear error listing the known studies otherwise."""
    studies = available()
    if name not in studies:
        known = ", ".join(studies) or "(none registered)"
        raise KeyError(
            f"Unknown study {name!r}. Known studies: {known}. A study added to pyproject.toml's "
            f"[project.entry-points.\"{ENTRY_POINT_GROUP}\"] appears after `pip install -e .`."
        )
    return importlib.import_module(studies[name])


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` torch threads (None: as they are), restoring the count after."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
