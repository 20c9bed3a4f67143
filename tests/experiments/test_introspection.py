"""End to end: `interp run introspection --quick` at a tiny setting on a tiny random Llama with
the default model's tokenizer and chat template. What can be checked at this size is the
bookkeeping: every rate is the judge applied to the stored completions, the gap difference is
the stored gaps' means, the best cell is the argmax of the continuous measure, and every stage
(sweep, controls, mechanism, trained bias) and figure is written."""

from __future__ import annotations

import json

import pytest

from interp import cli
from interp.judges import IntrospectionTrial, judge_introspection

pytestmark = pytest.mark.filterwarnings("ignore:No Chromium found")

ARGS = ["--quick", "--n-concepts", "2", "--layer-fractions", "0.3", "0.7", "--strengths", "4",
        "--max-new-tokens", "4", "--variants", "ORIGINAL", "UNPROMPTED", "--n-random", "2",
        "--bias-train-concepts", "4", "--bias-held-out", "2", "--bias-eval-concepts", "2",
        "--bias-steps", "2", "--bias-eval-layers", "1", "--sae-tokens", "4096", "--sae-expansion",
        "2", "--sae-k", "4"]


def _trials(rows):
    return [IntrospectionTrial(r["completion"], r["concept"], r["trial_type"]) for r in rows]


def test_study_end_to_end_on_a_tiny_model(tiny_chat_model_dir, tmp_path, monkeypatch):
    from interp import plots
    monkeypatch.setattr(plots, "find_chromium", lambda: None)
    out = tmp_path / "out"
    argv = ["run", "introspection", "--model", str(tiny_chat_model_dir), "--device", "cpu",
            "--out", str(out), *ARGS]
    assert cli.main(argv) == 0
    (path,) = out.glob("introspection/*/results.json")
    results = json.loads(path.read_text())
    assert results["options"]["n_concepts"] == 2  # explicit options win over --quick
    assert results["options"]["n_trials"] == 1  # --quick's value where none was given
    assert results["prompt_format"] == "chat template"
    cells = results["cells"]
    assert {(c["layer"], c["kind"], c["value"]) for c in cells} == {
        (layer, kind, v) for layer in results["layers"] for kind, v in (("raw", 4.0), ("relative", 1.0))}
    control = _trials(results["control"]["trials"])
    for c in cells:
        judged = judge_introspection(_trials(c["trials"]) + control)
        for name, rate in judged.rates.items():
            assert c["metrics"][name]["k"] == rate.k and c["metrics"][name]["n"] == rate.n
        n_inj = sum(r["trial_type"] == "injection" for r in c["trials"])
        assert n_inj == 2 and sum(r["trial_type"] == "forced" for r in c["trials"]) == 2
        assert c["gap_control"] == pytest.approx(sum(results["control"]["gap"]) / 2)
        assert c["gap_difference"] == pytest.approx(c["gap_injected"] - c["gap_control"])
        lo, hi = c["metrics"]["detection_hit_rate"]["ci"]
        assert 0 <= lo <= c["metrics"]["detection_hit_rate"]["rate"] <= hi <= 1
        if c["kind"] == "relative":
            assert c["relative_strength"] == pytest.approx(1.0)
    best = max(cells, key=lambda c: c["gap_difference"])
    assert (results["best_cell"]["layer"], results["best_cell"]["kind"]) == (best["layer"], best["kind"])

    controls = results["controls"]
    assert set(controls["variants"]) == {"ORIGINAL", "UNPROMPTED"}
    # ORIGINAL at the best cell is the best cell's own trials
    assert controls["variants"]["ORIGINAL"]["trials"] == best["trials"]
    assert len([r for r in controls["random"]["trials"] if r["trial_type"] == "injection"]) == 2
    assert controls["yes_bias"]["n_questions"] == 10

    mech = results["mechanism"]
    later = mech["later_layers"]
    assert later and all(layer > best["layer"] for layer in later)
    assert len(mech["exact"]["mlp"]["ablation"]) == len(later) == len(mech["relp"]["attn"])
    assert len(mech["atp"]["heads"][0]) == 4  # heads per layer
    assert mech["evidence"]["n_monotone"] <= mech["evidence"]["d_mlp"]
    lat = mech["latents"]  # SAEs trained at the evidence and gate MLP outputs
    assert lat["sites"]["evidence"] == f"blocks.{best['layer'] + 1}.hook_mlp_out"
    assert set(lat["per_sae"]) == set(lat["sites"].values()) == set(lat["saes"])
    for p in lat["per_sae"].values():
        assert len(p["top_atp"]) == 10
        assert [abs(t["atp"]) for t in p["top_atp"]] == sorted(
            (abs(t["atp"]) for t in p["top_atp"]), reverse=True)
        assert sum(t["exact"] is not None for t in p["top_atp"]) == 5
    for h, p in lat["per_sae"].items():  # latents + error = the MLP output (z -> out linear)
        i = mech["later_layers"].index(int(h.split(".")[1]))
        assert p["atp_sum"] + p["error_atp"] == pytest.approx(mech["atp"]["mlp"][i], rel=1e-3,
                                                              abs=1e-5)
    assert lat["evidence"]["n_latents"] == 2 * 64

    bias = results["trained_bias"]
    assert len(bias["losses"]) == 2 and bias["n_train_concepts"] == 4
    assert bias["per_layer"] and all(set(v) == {"before", "after"}
                                     for v in bias["per_layer"].values())
    for stem in ("rates_by_depth", "gap_heatmap"):
        assert (path.parent / f"{stem}.html").exists()
    assert {"vectors", "control_ORIGINAL", "mechanism", "bias_train"} <= set(results["units"])
