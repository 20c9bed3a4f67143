"""End to end: `interp run demo` (a quick smoke test of a study) on the default model."""

from __future__ import annotations

import json

from interp import cli, models, plots


def test_demo_writes_results_and_figures(tmp_path, capsys):
    assert cli.main(["run", "demo", "--out", str(tmp_path), "--seed", "1", "--top-k", "5"]) == 0
    out_dir = tmp_path / "demo" / models.DEFAULT_MODEL
    results = json.loads((out_dir / "results.json").read_text())
    assert results["config"]["seed"] == 1 and results["config"]["model"] == models.DEFAULT_MODEL
    assert len(results["top_tokens"]) == 5
    assert results["top_tokens"][0]["token"] == " Mary"
    probs = [t["prob"] for t in results["top_tokens"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    lens = results["logit_lens"]
    assert len(lens["labels"]) == len(lens["logit_diff"]) == 31  # 30 layers + final
    assert lens["logit_diff"][-1] > 0  # Mary beats John at the output
    assert results["environment"]["versions"]["transformer-lens"].startswith("3.")
    for stem in ("top_tokens", "logit_lens"):
        html = (out_dir / f"{stem}.html").read_text()
        assert "plotly" in html.lower()
        if plots.find_chromium():
            assert (out_dir / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "' Mary'" in printed and "results.json" in printed


def test_demo_rejects_a_multi_token_answer(tmp_path, capsys):
    import re

    assert cli.main(["run", "demo", "--out", str(tmp_path), "--answer", " Maryland and Virginia"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^interp: .*answer ' Maryland and Virginia' is not a single token.*\d tokens", err)
