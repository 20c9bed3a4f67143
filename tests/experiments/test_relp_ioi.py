"""End to end: `interp run relp-ioi` at small size on the default model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from scipy.stats import pearsonr

from interp import cli, models
from interp.attribution.patching import exact_patching
from interp.attribution.sites import FAMILIES as FAMILY_SPECS
from interp.tasks import generate_ioi

METHODS = ("atp", "atp_star", "atp_star_graddrop", "ig", "ig_activations", "relp", "relp_no_ln",
           "relp_no_identity", "relp_no_half", "relp_ln_only")
FAMILIES = ("resid", "attn", "mlp", "heads")


def test_relp_ioi_writes_the_agreement_table_and_figures(tmp_path, capsys, default_model):
    assert cli.main(["run", "relp-ioi", "--n-pairs", "1", "--ig-steps", "2", "--ig-activations",
                     "--out", str(tmp_path)]) == 0
    out_dir = tmp_path / "relp-ioi" / models.DEFAULT_MODEL
    results = json.loads((out_dir / "results.json").read_text())
    for family in FAMILIES:
        assert (out_dir / f"scatter_{family}.html").exists()
    assert results["logit_diff"]["clean"] > results["logit_diff"]["corrupt"]
    assert (out_dir / "heatmap_resid_exact.html").exists()
    printed = capsys.readouterr().out
    assert "Pearson r with exact patching" in printed

    # The table's Pearson r, recomputed from the saved scores with scipy (GradDrop's scores are
    # magnitudes, compared with |exact|).
    (score_dir,) = (out_dir / "scores").iterdir()  # one directory per setting
    saved = {m: torch.load(score_dir / f"{m}.pt", weights_only=False) for m in ("exact", *METHODS)}
    for family in FAMILIES:
        exact = saved["exact"][family].flat().double().numpy()
        for method in METHODS:
            scores = saved[method][family]
            r = pearsonr(scores.flat().double().numpy(), exact if scores.signed else abs(exact))
            assert results["agreement"][family][method]["pearson"] == pytest.approx(
                float(r.statistic), abs=1e-9), (family, method)

    # The saved exact scores are what a fresh exact patching call gives on the study's pairs
    # (the same generator, seed and corruption), at three layers of each family to save time.
    # Other layers make other batches of patched runs: the values agree to float32 rounding.
    model = default_model
    group = generate_ioi(model, 1, seed=0, corruption="abc")
    layers = (1, 15, 28)
    fams = [dataclasses.replace(FAMILY_SPECS[f], layers=layers) for f in FAMILIES]
    fresh = exact_patching(model, group.clean_tokens, group.corrupt_tokens, group.metric(model),
                           fams, progress=False)
    for family in FAMILIES:
        torch.testing.assert_close(saved["exact"][family].values[list(layers)],
                                   fresh[family].values, atol=2e-5, rtol=0,
                                   msg=lambda m, f=family: f"{f}: {m}")
        assert fresh[family].values.abs().max() > 1e-3, family

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
