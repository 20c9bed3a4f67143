"""What every judge returns: per-item verdicts with their inputs, rates with Wilson intervals,
means with t intervals, saved side by side.

A judge grades completions one by one (an item is a dict holding the inputs it saw, the prompt
and completion at least, and its verdict fields) and summarises them as *rates* (a count `k` of
`n` items, with a Wilson score interval) and *means* (of a per-item score, with a Student t
interval). `JudgeResult` holds both, and `JudgeResult.save` writes the items as JSON Lines and
the summary as JSON next to them, so a verdict can always be checked against the text it was
given.

Wilson intervals rather than the normal approximation `p +- 1.96 sqrt(p(1-p)/n)`: the latter
collapses to a zero-width interval at `k = 0` or `k = n`, exactly where small behaviour studies
often land (no refusals out of 32 completions), while Wilson's stays inside [0, 1] and keeps a
sensible width. The bounds come from `scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Judge",
    "JudgeResult",
    "Mean",
    "Rate",
    "check_lengths",
    "result_paths",
    "wilson_interval",
]


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `k / n`.

    Computed by `scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`. The bounds are
    exactly 0 at `k = 0` and exactly 1 at `k = n`.

    Args:
        k: number of successes, `0 <= k <= n`.
        n: number of trials; `n = 0` gives `(nan, nan)` (no data, no interval).
        confidence: coverage of the interval, in (0, 1).

    Returns:
        `(low, high)`.

    Raises:
        ValueError: `k` or `n` negative or not whole, `k > n`, or `confidence` outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(k) != k or int(n) != n:
        raise ValueError(f"k and n must be whole numbers, got k={k}, n={n}")
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    from scipy.stats import (
        binomtest,  # scipy is slow to import; only load it when needed
    )

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    low = 0.0 if k == 0 else float(ci.low)
    high = 1.0 if k == n else float(ci.high)
    return (max(0.0, low), min(1.0, high))


@dataclass(frozen=True)
class Rate:
    """A proportion `k / n` with its Wilson interval.

    Attributes:
        k: items that count (e.g. completions judged refusals).
        n: items considered; 0 makes `rate` and `ci95` NaN (saved as null).
        confidence: coverage of `ci`.
    """

    k: int
    n: int
    confidence: float = 0.95

    def __post_init__(self) -> None:
        wilson_interval(self.k, self.n, self.confidence)  # validates k, n and confidence

    @classmethod
    def of(cls, flags: Iterable[bool], confidence: float = 0.95) -> Rate:
        """The rate of True among `flags`."""
        flags = [bool(f) for f in flags]
        return cls(sum(flags), len(flags), confidence)

    @property
    def rate(self) -> float:
        """`k / n`, NaN when `n = 0`."""
        return self.k / self.n if self.n else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        """Wilson interval at `confidence`."""
        return wilson_interval(self.k, self.n, self.confidence)

    @property
    def ci95(self) -> tuple[float, float]:
        """Wilson 95% interval (whatever `confidence` is)."""
        return wilson_interval(self.k, self.n, 0.95)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.ci
        return {"k": self.k, "n": self.n, "rate": _finite(self.rate),
                "ci": [_finite(lo), _finite(hi)], "confidence": self.confidence}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rate:
        return cls(int(d["k"]), int(d["n"]), float(d.get("confidence", 0.95)))

    def __str__(self) -> str:
        lo, hi = self.ci
        return f"{self.rate:.3f} [{lo:.3f}, {hi:.3f}] ({self.k}/{self.n})"


@dataclass(frozen=True)
class Mean:
    """The mean of per-item scores with a Student t interval.

    The t interval (`scipy.stats.t`) assumes the mean is roughly normal, which holds for
    bounded scores such as BLEU over a few dozen items; for tiny or very skewed samples a
    bootstrap is safer. NaN scores are dropped (and counted in `n_nan`).

    Attributes:
        values: the scores.
        confidence: coverage of `ci`.
    """

    values: tuple[float, ...]
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))

    @property
    def _finite_values(self) -> list[float]:
        return [v for v in self.values if not math.isnan(v)]

    @property
    def n(self) -> int:
        return len(self._finite_values)

    @property
    def n_nan(self) -> int:
        return len(self.values) - self.n

    @property
    def mean(self) -> float:
        vals = self._finite_values
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof 1); NaN for fewer than two scores."""
        vals = self._finite_values
        if len(vals) < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))

    @property
    def ci(self) -> tuple[float, float]:
        """t interval of the mean; NaN for fewer than two scores, a point if all are equal."""
        if self.n < 2:
            return (math.nan, math.nan)
        sem = self.std / math.sqrt(self.n)
        if sem == 0:
            return (self.mean, self.mean)
        from scipy.stats import t

        lo, hi = t.interval(self.confidence, self.n - 1, loc=self.mean, scale=sem)
        return (float(lo), float(hi))

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.ci
        return {"mean": _finite(self.mean), "std": _finite(self.std), "n": self.n,
                "n_nan": self.n_nan, "ci": [_finite(lo), _finite(hi)],
                "confidence": self.confidence}

    def __str__(self) -> str:
        lo, hi = self.ci
        return f"{self.mean:.3f} [{lo:.3f}, {hi:.3f}] (n={self.n})"


def _finite(x: float | None) -> float | None:
    """NaN as None, so that saved JSON stays strict."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _clean(obj: Any) -> Any:
    """Items and stats as strict JSON: NaN floats become None, tuples lists."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _clean(obj.item())
    return obj


def result_paths(path: str | Path) -> tuple[Path, Path]:
    """Where `JudgeResult.save(path)` writes: `(items .jsonl, summary .json)`.

    `path` may name either file or their common stem: `out/refusal`, `out/refusal.jsonl` and
    `out/refusal.json` all give `out/refusal.jsonl` and `out/refusal.json`.
    """
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".jsonl"), path.with_name(path.name + ".json")


@dataclass
class JudgeResult:
    """Per-item verdicts of one judge with their summary.

    Attributes:
        judge: the judge's name (e.g. `"refusal"`, `"similarity"`, `"introspection"`).
        items: one dict per graded completion: the inputs (`prompt`, `completion`, and what
            else the judge used, e.g. `reference`, `concept`) and the verdict fields.
        rates: named rates (a `Rate` each), e.g. `"refused_substring"`.
        means: named means of per-item scores (a `Mean` each), e.g. `"bleu"`.
        stats: other summary numbers (agreement statistics, counts), JSON-friendly.
        config: the judge's settings (phrases, thresholds, model names), JSON-friendly.
        primary: the name of the headline rate (or mean) that `rate` and `ci95` read.
    """

    judge: str
    items: list[dict[str, Any]]
    rates: dict[str, Rate] = field(default_factory=dict)
    means: dict[str, Mean] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    primary: str | None = None

    def _headline(self) -> Rate | Mean:
        if self.primary is None:
            raise ValueError(f"the {self.judge} result has no primary rate; read .rates or .means "
                             f"({sorted(self.rates)}, {sorted(self.means)})")
        if self.primary in self.rates:
            return self.rates[self.primary]
        if self.primary in self.means:
            return self.means[self.primary]
        raise KeyError(f"primary {self.primary!r} is neither a rate ({sorted(self.rates)}) nor a "
                       f"mean ({sorted(self.means)})")

    @property
    def rate(self) -> float:
        """The primary rate (or mean)."""
        head = self._headline()
        return head.rate if isinstance(head, Rate) else head.mean

    @property
    def ci95(self) -> tuple[float, float]:
        """95% interval of the primary rate (Wilson) or mean (t)."""
        head = self._headline()
        if isinstance(head, Rate):
            return head.ci95
        return Mean(head.values, 0.95).ci

    def verdicts(self, key: str | None = None) -> list[Any]:
        """The field `key` of every item (default: the primary one)."""
        key = key or self.primary
        if key is None:
            raise ValueError("pass the name of an item field")
        missing = [i for i, it in enumerate(self.items) if key not in it]
        if missing:
            fields = sorted(self.items[missing[0]])
            raise KeyError(f"items {missing[:5]} have no field {key!r} (fields: {fields})")
        return [it[key] for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> dict[str, Any]:
        """Everything but the items, as strict JSON-friendly data."""
        return _clean({
            "judge": self.judge, "primary": self.primary, "n_items": len(self.items),
            "rates": {k: r.to_dict() for k, r in self.rates.items()},
            "means": {k: m.to_dict() for k, m in self.means.items()},
            "stats": self.stats, "config": self.config,
        })

    def to_dict(self) -> dict[str, Any]:
        """The summary plus the items."""
        return dict(self.summary(), items=_clean(self.items))

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write the items (one JSON object a line) and the summary (JSON) side by side.

        Args:
            path: the stem, or either file name (see `result_paths`); folders are created.

        Returns:
            `(items_path, summary_path)`.
        """
        items_path, summary_path = result_paths(path)
        items_path.parent.mkdir(parents=True, exist_ok=True)
        with items_path.open("w") as f:
            for item in self.items:
                f.write(json.dumps(_clean(item), ensure_ascii=False) + "\n")
        summary = dict(self.summary(), items_file=items_path.name,
                       scores={k: _clean(list(m.values)) for k, m in self.means.items()})
        summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return items_path, summary_path

    @classmethod
    def load(cls, path: str | Path) -> JudgeResult:
        """Read a result written by `save` (missing scores come back as NaN)."""
        items_path, summary_path = result_paths(path)
        for p in (items_path, summary_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist; JudgeResult.save writes both "
                                        f"{items_path.name} and {summary_path.name}")
        summary = json.loads(summary_path.read_text())
        items = [json.loads(line) for line in items_path.read_text().splitlines() if line.strip()]
        means = {k: Mean(tuple(math.nan if v is None else v for v in vals),
                         summary["means"][k].get("confidence", 0.95))
                 for k, vals in summary.get("scores", {}).items()}
        return cls(
            judge=summary["judge"], items=items,
            rates={k: Rate.from_dict(d) for k, d in summary.get("rates", {}).items()},
            means=means, stats=summary.get("stats", {}), config=summary.get("config", {}),
            primary=summary.get("primary"),
        )

    def __str__(self) -> str:
        lines = [f"{self.judge}: {len(self.items)} items"]
        lines += [f"  {k}: {r}" for k, r in self.rates.items()]
        lines += [f"  {k}: {m}" for k, m in self.means.items()]
        lines += [f"  {k}: {v}" for k, v in self.stats.items() if not isinstance(v, (dict, list))]
        return "\n".join(lines)


@runtime_checkable
class Judge(Protocol):
    """A text judge: completions (and optionally their prompts) in, a `JudgeResult` out.

    `SubstringRefusalJudge` and `LLMJudge` follow it, so one can stand in for the other.
    """

    name: str

    def __call__(
        self, completions: Sequence[str], prompts: Sequence[str] | None = None
    ) -> JudgeResult: ...


def check_lengths(what: str, completions: Sequence[Any], **others: Sequence[Any] | None) -> None:
    """Raise a ValueError naming the argument whose length differs from `completions`."""
    for name, seq in others.items():
        if seq is not None and len(seq) != len(completions):
            raise ValueError(f"{what}: got {len(completions)} completions but {len(seq)} {name}; "
                             f"pass one {name.rstrip('s')} per completion")
