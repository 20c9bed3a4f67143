"""End to end: `interp run relp-ioi` at small size on the default model."""

from __future__ import annotations

import json

import pytest

from interp import cli, models


def test_relp_ioi_writes_the_agreement_table_and_figures(tmp_path, capsys):
    assert cli.main(["run", "relp-ioi", "--n-pairs", "1", "--ig-steps", "2", "--ig-activations",
                     "--out", str(tmp_path)]) == 0
    out_dir = tmp_path / "relp-ioi" / models.DEFAULT_MODEL
    results = json.loads((out_dir / "results.json").read_text())
    for family in ("resid", "attn", "mlp", "heads"):
        for method in ("atp", "atp_star", "atp_star_graddrop", "ig", "ig_activations", "relp", "relp_no_ln",
                       "relp_no_identity", "relp_no_half", "relp_ln_only"):
            entry = results["agreement"][family][method]
            assert -1 <= entry["pearson"] <= 1 and -1 <= entry["spearman"] <= 1
        assert (out_dir / f"scatter_{family}.html").exists()
    assert results["paper_pearson"]["values"]["mlp"]["relp"] == 0.992
    assert results["logit_diff"]["clean"] > results["logit_diff"]["corrupt"]
    assert (out_dir / "heatmap_resid_exact.html").exists()
    printed = capsys.readouterr().out
    assert "Pearson r with exact patching" in printed

    # a second run with the same settings resumes from the saved scores
    assert cli.main(["run", "relp-ioi", "--n-pairs", "1", "--ig-steps", "2", "--out", str(tmp_path)]) == 0
    assert "exact: loaded from" in capsys.readouterr().out


@pytest.mark.online
def test_paper_setting_gpt2_prints_the_papers_numbers(tmp_path, capsys):
    """The paper's own model, one command, where the Hub can be reached."""
    try:
        models.check_hub("gpt2")
    except models.HubUnreachableError as exc:
        pytest.skip(str(exc))
    assert cli.main(["run", "relp-ioi", "--model", "gpt2", "--n-pairs", "2", "--ig-steps", "2",
                     "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "relp-ioi" / "gpt2" / "results.json").read_text())
    assert results["paper_pearson"]["values"]["mlp"] == {"atp": 0.195, "relp": 0.992}
    assert "[0.992]" in capsys.readouterr().out
