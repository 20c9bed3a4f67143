"""End to end: `interp run sae-circuits` on the default model with SAEs trained in seconds.

The SAEs are useless (one training step) but real: trained by SAELens's runner from the corpus,
saved, loaded back, attached with error terms. What is checked does not depend on their
quality: the faithfulness curve starts at 0 and ends at 1 (every node kept reproduces the
model's own metric), the SVA metric has the right sign, scores and SAEs are reused on a rerun.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interp import cli

ARGS = ["--layers", "2,4", "--n-tokens", "2048", "--epochs", "1", "--eval-tokens", "256",
        "--expansion", "1", "--n-pairs", "4", "--ig-steps", "2", "--n-pages", "2"]


@pytest.mark.slow  # two SAEs trained on SmolLM2: minutes on 2 cores
def test_sae_circuits_end_to_end(tmp_path, monkeypatch, capsys):
    import experiments.sae_circuits as study

    monkeypatch.setattr(study, "saes_dir", lambda: tmp_path / "saes")
    argv = ["run", "sae-circuits", "--out", str(tmp_path / "out"), *ARGS]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "training blocks.2.hook_resid_pre" in first
    out = tmp_path / "out" / "sae-circuits" / "smollm2-135m-instruct"
    results = json.loads((out / "results.json").read_text())

    assert results["logit_diff"]["clean"] > 0 > results["logit_diff"]["corrupt"]
    assert set(results["sae_quality"]) == {"blocks.2.hook_resid_pre", "blocks.4.hook_resid_pre"}
    for curve in results["faithfulness"].values():
        assert curve["counts"][0] == 0 and curve["counts"][-1] == curve["n_nodes"]
        assert curve["faithfulness"][0] == pytest.approx(0.0, abs=1e-6)
        assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-3)
        assert curve["m_full"] == pytest.approx(results["faithfulness"]["relp"]["m_full"])
    n_pos = 5  # "The author near the dogs": SmolLM2 adds no BOS
    assert results["faithfulness"]["relp"]["n_nodes"] == 2 * n_pos * (576 + 1)
    assert results["cost_ratio_ig_over_relp"] == pytest.approx(
        results["cost_s"]["ig"] / results["cost_s"]["relp"])
    top = results["top_nodes_relp"]
    assert [abs(r["relp"]) for r in top] == sorted((abs(r["relp"]) for r in top), reverse=True)
    assert (out / "faithfulness.html").exists()
    assert results["feature_pages"]
    for page in results["feature_pages"].values():
        assert Path(page["index"]).exists()

    assert cli.main(argv) == 0  # rerun: SAEs and scores come from disk
    second = capsys.readouterr().out
    assert "training blocks." not in second and "relp: loaded from" in second
    again = json.loads((out / "results.json").read_text())
    assert again["faithfulness"]["ig"]["faithfulness"] == results["faithfulness"]["ig"]["faithfulness"]


def test_bad_layer_is_reported(tmp_path, capsys):
    assert cli.main(["run", "sae-circuits", "--out", str(tmp_path), "--layers", "99"]) == 2
    assert "layers [99] out of range: smollm2-135m-instruct has 30" in capsys.readouterr().err
