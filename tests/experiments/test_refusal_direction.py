"""End to end: `interp run refusal-direction` on the default model with a handful of prompts and
one candidate layer (about a minute on 2 CPU cores). What can be checked at this size is that the
numbers written are the numbers measured: every rate is recomputed from the stored completions
with the judge, and the selected candidate's scores from the stored selection table."""

from __future__ import annotations

import json

import pytest

from experiments.refusal_direction import CONDITIONS, wilson
from interp import cli, models
from interp.concepts.refusal import is_refusal, load_instructions
from interp.judges import JudgeResult


def test_wilson_interval_matches_hand_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 32)[0] == 0.0 and wilson(0, 32)[1] == pytest.approx(0.1072, abs=1e-4)
    assert wilson(32, 32)[1] == 1.0


@pytest.mark.filterwarnings("ignore:no candidate refusal direction passed")
def test_study_writes_rates_that_match_its_own_judgements(tmp_path, capsys):
    out = tmp_path / "out"
    n_test, layer = 4, 10
    argv = ["run", "refusal-direction", "--model", models.DEFAULT_MODEL, "--device", "cpu",
            "--out", str(out), "--n-train", "8", "--n-val", "4", "--n-test", str(n_test),
            "--max-new-tokens", "8", "--layers", str(layer), "--batch-size", "8"]
    assert cli.main(argv) == 0
    results = json.loads((out / "refusal-direction" / models.DEFAULT_MODEL / "results.json").read_text())
    report = results["report"]
    assert report["settings"]["n_test"] == n_test and report["settings"]["layers"] == [layer]

    # The direction is one of the evaluated candidates, and its reported scores are its row.
    sel, table = report["selected"], results["selection_scores"]
    n_post = report["settings"]["n_post"]
    assert sel["layer"] == layer and -n_post <= sel["position"] <= -1
    row = sel["position"] + n_post
    for key in ("kl", "bypass", "induce"):
        assert table[key][row][layer] == pytest.approx(sel[key], rel=1e-6)
        assert all(v is None for r in table[key] for i, v in enumerate(r) if i != layer)
    assert sel["kl"] >= 0

    # Rates: one judgement per test prompt, each the judge applied to the stored completion.
    assert report["test_instructions"]["harmful"] == load_instructions("harmful", "test", n_test, 0)
    for k in CONDITIONS:
        refused, texts = report["refused"][k], report["completions"][k]
        assert len(refused) == len(texts) == n_test
        assert refused == [is_refusal(t) for t in texts]
        rate = report["refusal_rate"][k]
        assert 0.0 <= rate <= 1.0 and rate == sum(refused) / n_test
        assert report["refusal_count"][k] == [sum(refused), n_test]
        lo, hi = report["refusal_rate_ci95"][k]
        assert lo <= rate <= hi
        assert report["examples"][k] == texts[:3]
        # both judges on every completion, saved beside the results: the phrase verdicts are
        # the stored ones, and the per-completion refusal scores average to the test score
        judged = JudgeResult.load(out / "refusal-direction" / models.DEFAULT_MODEL / "judged" / k)
        assert judged.verdicts("completion") == texts and judged.verdicts("refused") == refused
        item_scores = judged.verdicts("refusal_score")
        assert sum(item_scores) / n_test == pytest.approx(report["test_scores"][k], abs=1e-5)
        by_score = [x > 0 for x in item_scores]
        agree = sum(a == b for a, b in zip(by_score, refused)) / n_test
        assert report["judges"][k]["rates"]["agreement"]["rate"] == pytest.approx(agree)
    t = results["timings_s"]
    assert t["total"] >= t["select"] + t["generate"] > 0

    printed = capsys.readouterr().out
    assert f"Refusal direction on {models.DEFAULT_MODEL}: layer {layer}" in printed
    for k in CONDITIONS:
        assert k.replace("_", " ") in printed
