"""Where the shared data sets live (`../shared/data` beside the project; see its README).

Nothing in `interp` copies data into the repository: loaders take paths under `data_dir()`.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Default: `shared/data` next to the project's checkout.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_dir() -> Path:
    """`$INTERP_DATA_DIR`, default `../shared/data` relative to the project root.

    Raises:
        FileNotFoundError: naming the directory tried and how to point elsewhere.
    """
    path = Path(os.environ.get("INTERP_DATA_DIR", DEFAULT_DATA_DIR)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"Data directory {path} does not exist. Put the shared data there or set "
            "INTERP_DATA_DIR to the folder that holds it (the one with README.md, refusal/, ioi/ ...)."
        )
    return path


def data_file(relative: str | Path) -> Path:
    """A file under `data_dir()`; the error names the full path and what the folder holds."""
    root = data_dir()
    path = root / relative
    if not path.exists():
        present = ", ".join(sorted(p.name for p in root.iterdir())) or "(empty)"
        raise FileNotFoundError(f"{path} not found. {root} holds: {present}.")
    return path
