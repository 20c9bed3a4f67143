"""Tests for interp.judges.base: Wilson intervals against the closed form, rates, means and
saving."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from scipy.stats import norm
from scipy.stats import t as student_t

from interp.judges.base import JudgeResult, Mean, Rate, result_paths, wilson_interval


def _wilson_formula(k, n, confidence=0.95):
    """Wilson (1927): (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    z = norm.ppf(1 - (1 - confidence) / 2)
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


@pytest.mark.parametrize("k,n", [(0, 32), (1, 10), (5, 10), (9, 10), (32, 32), (17, 1000), (1, 1)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_wilson_matches_closed_form(k, n, confidence):
    assert wilson_interval(k, n, confidence) == pytest.approx(_wilson_formula(k, n, confidence),
                                                              abs=1e-12)


def test_wilson_known_values_and_edges():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 32)[0] == 0.0 and wilson_interval(32, 32)[1] == 1.0
    lo, hi = wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)


@pytest.mark.unchecked
@pytest.mark.parametrize("args", [(3, 2), (-1, 5), (1, -1), (1.5, 3)])
def test_wilson_rejects_bad_counts(args):
    with pytest.raises(ValueError, match="k"):
        wilson_interval(*args)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.0)


def test_rate():
    r = Rate.of([True, False, True, True])
    assert (r.k, r.n, r.rate) == (3, 4, 0.75)
    assert r.ci95 == pytest.approx(_wilson_formula(3, 4))
    assert Rate(3, 4, 0.9).ci == pytest.approx(_wilson_formula(3, 4, 0.9))
    assert Rate.from_dict(r.to_dict()) == r
    empty = Rate.of([])
    assert math.isnan(empty.rate) and empty.to_dict()["rate"] is None
    with pytest.raises(ValueError):
        Rate(5, 4)


def test_mean_t_interval():
    values = [0.2, 0.5, 0.9, 0.4]
    m = Mean(tuple(values))
    mu, sd = statistics.mean(values), statistics.stdev(values)
    half = student_t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    assert m.mean == pytest.approx(mu) and m.std == pytest.approx(sd)
    assert m.ci == pytest.approx((mu - half, mu + half))
    assert Mean((0.3, 0.3)).ci == (0.3, 0.3)
    one = Mean((0.5, float("nan")))
    assert one.n == 1 and one.n_nan == 1 and one.mean == 0.5 and math.isnan(one.ci[0])


def test_result_paths():
    for p in ("out/x", "out/x.jsonl", "out/x.json"):
        assert tuple(map(str, result_paths(p))) == ("out/x.jsonl", "out/x.json")


def test_save_writes_strict_json_and_loads_back(tmp_path):
    res = JudgeResult(
        "demo", [{"prompt": "p", "completion": "c", "ok": True, "score": float("nan")},
                 {"prompt": "q", "completion": "d", "ok": False, "score": 0.5}],
        rates={"ok": Rate(1, 2)}, means={"score": Mean((float("nan"), 0.5))},
        stats={"kappa": float("nan")}, primary="ok",
    )
    items_path, summary_path = res.save(tmp_path / "sub" / "demo")
    for line in items_path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    summary = json.loads(summary_path.read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert summary["rates"]["ok"]["k"] == 1 and summary["stats"]["kappa"] is None
    assert summary["items_file"] == "demo.jsonl"
    again = JudgeResult.load(summary_path)
    assert again.rates == res.rates and again.primary == "ok"
    assert again.means["score"].mean == 0.5 and again.means["score"].n_nan == 1
    assert again.items[0]["score"] is None and again.items[1]["score"] == 0.5
    assert res.verdicts() == [True, False] and res.verdicts("prompt") == ["p", "q"]
    assert "demo: 2 items" in str(res)


def test_result_without_primary_says_what_to_read():
    res = JudgeResult("x", [], rates={"a": Rate(0, 0)})
    with pytest.raises(ValueError, match="no primary rate"):
        _ = res.rate
    with pytest.raises(KeyError, match="no field"):
        JudgeResult("x", [{"a": 1}], primary="b").verdicts()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        JudgeResult.load("/nonexistent/dir/r")
