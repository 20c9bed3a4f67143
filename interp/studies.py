"""The registry of studies that `interp run <study>` runs, and the opening every study shares.

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

**Declarative options.** A study that keeps its options in a dataclass (`Options`, one field
per option, its help text in `option(...)`) gets its parser from it:
`add_arguments = options_parser(Options)`. Defaults then have one home: the dataclass serves the
command line, the Python call `run(config, **options)` and the record in `results.json`.

**The opening.** `StudyRun` does what every study repeats: seed torch, make the output
directory, load the model (timed), time the stages, keep a resume cache keyed on the settings
that decide the numbers, and write `results.json` with the config, the options and the
timings:

    def run(config, **options):
        opts = Options(**options)
        with StudyRun("my-study", config, opts, ignore=("batch_size",)) as study:
            model = study.load_model()
            with study.timer("scores"):
                scores = study.cached("scores", lambda: compute(model))
            return study.finish({"scores": scores})
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from interp.models import DEFAULT_MODEL

ENTRY_POINT_GROUP = "interp.studies"
T = TypeVar("T")


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
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyInputError(
                f"cannot create the output directory {path} ({exc.strerror}); pass --out with a "
                f"writable directory") from exc
        return path


class StudyInputError(ValueError):
    """A study's input is unusable; the message names what and how to fix it (the CLI prints
    it as one line and exits 2)."""


def available() -> dict[str, str]:
    """Study name -> module path, from the installed entry points."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.value for ep in sorted(eps, key=lambda e: e.name)}


def get(name: str) -> types.ModuleType:
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


# --------------------------------------------------------------------------------------------
# Declarative options
# --------------------------------------------------------------------------------------------


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           choices: Sequence[Any] | None = None, minimum: float | None = None,
           negate: str | None = None, **kwargs: Any) -> Any:
    """A study option: a dataclass field whose metadata also builds its command-line flag.

    Args:
        default: the default (for a list, give a tuple or use `default_factory=` in kwargs).
        help: the help text; the default is appended to it.
        flag: the flag's name (default `--field-name`).
        choices: allowed values.
        minimum: smallest allowed value of a number (checked by `check_options` and at the
            command line).
        negate: for a bool that defaults to True, the flag that turns it off
            (e.g. `"--no-generate"`); a bool defaulting to False gets a `store_true` flag.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "minimum": minimum, "negate": negate}
    return field(default=default, metadata=meta, **kwargs)


def _minimum_type(kind: Callable[[str], Any], minimum: float, flag: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def options_parser(options_cls: type) -> Callable[[argparse.ArgumentParser], None]:
    """`add_arguments(parser)` built from an options dataclass (see `option`).

    Field types map to argparse: `int`, `float`, `str`, `Path`, `bool` (flags), `X | None`
    (the same, default None) and `list[X]` / `tuple[X, ...]` (`nargs="+"`).
    """
    hints = typing.get_type_hints(options_cls)

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(options_cls):
            meta = f.metadata
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            kind, many = _argparse_type(hints[f.name])
            text = meta.get("help", "").replace("%", "%%")  # argparse formats help with %
            if kind is bool:
                if meta.get("negate"):
                    parser.add_argument(meta["negate"], dest=f.name, action="store_false",
                                        help=text)
                else:
                    parser.add_argument(flag, dest=f.name, action="store_true", help=text)
                parser.set_defaults(**{f.name: default})
                continue
            if meta.get("minimum") is not None:
                kind = _minimum_type(kind, meta["minimum"], flag)
            shown = "" if default is None else f" (default {_show(default)})"
            kwargs: dict[str, Any] = {"type": kind, "default": default, "dest": f.name,
                                      "help": text + shown}
            if many:
                kwargs["nargs"] = "+"
            if meta.get("choices") is not None:
                kwargs["choices"] = list(meta["choices"])
            parser.add_argument(flag, **kwargs)

    return add_arguments


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _argparse_type(hint: Any) -> tuple[Any, bool]:
    """(element type, is a list) of a field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _argparse_type(args[0])
    if origin in (list, tuple, Sequence):
        return (args[0] if args else str), True
    if hint in (int, float, str, bool):
        return hint, False
    if hint is Path:
        return Path, False
    return str, False


def with_quick(options: T, quick: dict[str, Any]) -> T:
    """`options` (a dataclass) with the `quick` table applied where an option still has its
    default: `--quick` shrinks what the user did not set, and an option given explicitly
    stays (`--quick --sigmas 0.3 1 3` runs those sigmas). An explicit value equal to the
    default cannot be told apart from none and gives way to `quick`."""
    bad = sorted(set(quick) - {f.name for f in dataclasses.fields(options)})
    if bad:
        raise ValueError(f"the quick table names options {bad} that {type(options).__name__} lacks")
    defaults = type(options)()
    return dataclasses.replace(options, **{k: v for k, v in quick.items()
                                           if getattr(options, k) == getattr(defaults, k)})


def check_options(options: Any) -> None:
    """Raise `StudyInputError` for a number below its field's `minimum` (the Python call's
    equivalent of the command line's check)."""
    for f in dataclasses.fields(options):
        if f.metadata.get("minimum") is not None:
            check_minimum(f.name, getattr(options, f.name), f.metadata["minimum"])


def check_minimum(name: str, value: Any, minimum: float) -> None:
    """Raise `StudyInputError` when the option `name`'s value (a number, or a list of numbers;
    None passes) is below `minimum`. For studies whose options are plain `run` arguments; an
    options dataclass gets this from `option(..., minimum=...)`."""
    values = [] if value is None else value if isinstance(value, (list, tuple)) else [value]
    if any(v < minimum for v in values):
        raise StudyInputError(f"{name} must be >= {minimum}, got {value}; pass a value "
                              f">= {minimum} (--{name.replace('_', '-')})")


# --------------------------------------------------------------------------------------------
# The opening every study shares
# --------------------------------------------------------------------------------------------


def fingerprint(settings: dict[str, Any], length: int = 12) -> str:
    """A short stable hash of JSON-able settings (the key of a resume cache)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class StudyRun:
    """One run of a study: seed, output directory, model, timings, resume cache, results.

    Use it as a context manager (or call `finish` without one). The resume cache lives under
    `<out>/cache/<key>/`, where `key` hashes the study name, the model, dtype and seed and every
    option except those in `ignore` (options that do not change the numbers, such as batch size
    or thread count). A run with other settings therefore never reads a stale entry; a rerun with
    the same settings reuses every unit it saved (`cached`), so an interrupted run loses at most
    the unit it was computing. Entries are written to a temporary file and renamed, so a kill
    mid-write leaves no half entry.

    Attributes:
        name: the study's name.
        config: the common options.
        options: the study's options dataclass (or None).
        out: `out/<study>/<model>/`.
        key: the resume cache key.
        timings: seconds per timed stage (`timer`), plus `load` and `total`.
        loaded: names of the cache entries read back from an earlier run.
    """

    def __init__(self, name: str, config: StudyConfig, options: Any = None,
                 ignore: Sequence[str] = ()):
        self.name, self.config, self.options = name, config, options
        if options is not None:
            check_options(options)
        self.out = config.out_dir(name)
        self.settings = {"study": name, "model": config.model, "dtype": str(config.dtype),
                         "seed": config.seed,
                         **{k: v for k, v in self.options_dict().items() if k not in ignore}}
        self.key = fingerprint(self.settings)
        self.timings: dict[str, float] = {}
        self.loaded: list[str] = []
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        torch.manual_seed(config.seed)

    def options_dict(self) -> dict[str, Any]:
        if self.options is None:
            return {}
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self.options).items()}

    def __enter__(self) -> StudyRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    @property
    def cache_dir(self) -> Path:
        path = self.out / "cache" / self.key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def load_model(self, **kwargs: Any):
        """`interp.models.load(config.model, device=..., dtype=..., **kwargs)`, timed as `load`."""
        from interp import models

        t0 = time.perf_counter()
        model = models.load(self.config.model, device=self.config.device,
                            dtype=self.config.dtype, **kwargs)
        self.timings["load"] = self.timings.get("load", 0.0) + time.perf_counter() - t0
        return model

    @contextmanager
    def timer(self, stage: str) -> Iterator[None]:
        """Time the block as `timings[stage]` (added up when a stage is timed twice)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    def cached(self, unit: str, compute: Callable[[], T]) -> T:
        """`compute()`, saved as cache entry `unit`; read back instead when a run with the same
        settings saved it before (listed in `loaded`). Values go through `torch.save`, so
        tensors, dicts, lists and dataclasses of them work."""
        path = self.cache_dir / f"{unit.replace('/', '__')}.pt"
        if path.exists():
            try:
                value = torch.load(path, weights_only=False)
            except Exception:  # a corrupt entry is recomputed, not crashed on
                path.unlink()
            else:
                self.loaded.append(unit)
                return value
        value = compute()
        tmp = path.with_suffix(".tmp")
        torch.save(value, tmp)
        tmp.replace(path)
        return value

    def finish(self, results: dict[str, Any]) -> dict[str, Any]:
        """Write `results.json`: `results` plus the study name, config, options, cache key, the
        cache entries reused and the timings (with `total` and `total_cpu`); return it."""
        from interp.results import write_results

        self.timings["total"] = time.perf_counter() - self._t0
        self.timings["total_cpu"] = time.process_time() - self._cpu0
        self.timings["threads"] = torch.get_num_threads()
        full = {"study": self.name, "config": self.config, "options": self.options_dict(),
                "cache_key": self.key, "reused_from_cache": list(self.loaded), **results,
                "timings_s": {**results.get("timings_s", {}), **self.timings}}
        path = write_results(self.out, full)
        print(f"wrote {path}")
        return full
