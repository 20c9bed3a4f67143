"""End to end: `interp run emergent-misalignment` on a tiny random chat model (its numbers mean
nothing; what is checked is that the numbers written are the numbers measured: every rate is
recomputed from the saved completions, every drop from the rates, the splits never overlap,
and the organism is a named variant that loads by name)."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.emergent_misalignment import QUICK, Options, grid
from interp import cli, models, plots
from interp.concepts.domains import DOMAINS
from interp.judges import JudgeResult, is_refusal
from interp.studies import StudyInputError

ARGS = ["--n-eval", "2", "--n-train", "2", "--n-harmless-train", "3", "--n-harmless-eval", "2",
        "--max-new-tokens", "4", "--distill-tokens", "4", "--organism-epochs", "1",
        "--unlearn-steps", "1", "--n-retain", "1", "--n-corpus", "2", "--targets", "safety",
        "--pairs", "npo:lora", "--direction-layers", "1"]


@pytest.fixture(scope="module")
def finished(tiny_chat_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("em")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INTERP_CACHE_DIR", str(root / "cache_home"))
        mp.setattr(plots, "find_chromium", lambda: None)
        argv = ["run", "emergent-misalignment", "--model", str(tiny_chat_model_dir), "--device",
                "cpu", "--out", str(root / "out"), *ARGS]
        assert cli.main(argv) == 0
        (path,) = (root / "out" / "emergent-misalignment").glob("*/results.json")
        results = json.loads(path.read_text())
        yield results, path.parent, root, argv


@pytest.mark.filterwarnings("ignore:No Chromium found")
def test_rates_drops_and_splits_are_what_was_measured(finished):
    results, out, _, _ = finished
    split = results["split"]
    for d in DOMAINS:
        assert not set(split["train"][d]) & set(split["eval"][d])
        assert results["counts"][d]["eval"] == len(split["eval"][d]) == 2
    train_all = {p for d in DOMAINS for p in split["train"][d]}
    assert not train_all & {p for d in DOMAINS for p in split["eval"][d]}

    # every rate: the judge on the saved completions of that state and set
    states = {"organism": results["organism"]["refusal"], "base": results["base"]["refusal"]}
    for r in results["runs"]:
        states[f"{r['target']}_{r['method']}_{r['scope']}_{r['kind']}"] = r["refusal"]
    assert len(results["runs"]) == 2  # unlearned and contained
    for state, rates in states.items():
        for name in [*DOMAINS, "harmless"]:
            judged = JudgeResult.load(out / "judged" / state / name)
            refused = [is_refusal(t) for t in judged.verdicts("completion")]
            assert refused == judged.verdicts("refused")
            assert rates[name]["k"] == sum(refused) and rates[name]["n"] == len(refused)
            assert rates[name]["rate"] == sum(refused) / len(refused)
            lo, hi = rates[name]["ci95"]
            assert lo <= rates[name]["rate"] <= hi
            if name != "harmless":
                assert judged.verdicts("prompt") == split["eval"][name]

    # drops and spread from those rates
    org = results["organism"]["refusal"]
    for row in results["analysis"]["rows"]:
        run = next(r for r in results["runs"] if r["kind"] == row["kind"])
        for d in DOMAINS:
            assert row["drop"][d] == pytest.approx(org[d]["rate"] - run["refusal"][d]["rate"])
        others = [d for d in DOMAINS if d != "safety"]
        assert row["spread"] == pytest.approx(sum(row["drop"][d] for d in others) / 6)
    corr = results["analysis"]["correlation"]
    assert {c["band"] for c in corr} == {"early", "late"} and all(c["n"] == 6 for c in corr)
    sim = torch.tensor(results["similarity"]["by_layer"])
    n_layers = sim.shape[0]
    assert sim.shape == (n_layers, 7, 7)
    # layer 0's resid_pre at the last token is that token's embedding, the same for every
    # prompt: zero vectors, cosine 0; every later layer has cosine 1 on the diagonal
    diag = sim.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(diag[1:], torch.ones(n_layers - 1, 7), atol=1e-5, rtol=0)
    assert float(diag[0].abs().max()) < 1e-5
    assert set(results["analysis"]["claims"]) == {"spread", "containment", "early_similarity",
                                                  "safety_spreads_more"}
    assert results["runs"][1]["train"]["loss"] == "npo_gd"  # the contained NPO run
    assert (out / "refusal_bars_safety.html").exists() and (out / "similarity_vs_drop.html").exists()


@pytest.mark.filterwarnings("ignore:No Chromium found")
def test_organism_is_a_named_variant_and_a_rerun_reuses_every_unit(finished, capsys):
    results, out, root, argv = finished
    name = results["organism"]["variant"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INTERP_CACHE_DIR", str(root / "cache_home"))
        mp.setattr(plots, "find_chromium", lambda: None)
        info = models.read_variant(name)
        assert info["metadata"]["study"] == "emergent-misalignment"
        assert cli.main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert set(again["reused_from_cache"]) == {
        "base_answers", "eval/base", "organism", "eval/organism", "vectors", "direction",
        "run/safety/npo/lora/unlearned", "run/safety/npo/lora/contained"}
    assert again["analysis"] == results["analysis"]


def test_grid_and_quick_settings():
    assert grid(Options()) == [("npo", "full"), ("npo", "lora"), ("sft", "full"), ("sft", "lora")]
    assert grid(Options(pairs=["sft:full"])) == [("sft", "full")]
    with pytest.raises(StudyInputError, match="method:scope"):
        grid(Options(pairs=["npo"]))
    assert set(QUICK) <= set(Options.__dataclass_fields__)


@pytest.mark.parametrize(("contained_rates", "holds"), [
    ({"target": 0.25, "others": 0.75}, True),   # spread 1.0 -> 0.25, target keeps 0.75 of its drop
    ({"target": 1.00, "others": 1.00}, False),  # no spread, but the target was not unlearned
    ({"target": 0.50, "others": 1.00}, True),   # half the target's unlearning kept: the boundary
    ({"target": 0.00, "others": 0.25}, False),  # target fully unlearned, spread only 1.0 -> 0.75
])
def test_containment_needs_the_target_still_unlearned(contained_rates, holds):
    """The verdict on the paper's containment claim, on rates written by hand: a retain term
    that stops the target's unlearning is not containment (Gemma's quick grid did exactly that)."""
    from experiments.emergent_misalignment import analyse

    def rates(target_rate, other_rate):
        return {d: {"rate": target_rate if d == "cybersecurity" else other_rate}
                for d in [*DOMAINS, "harmless"]}

    organism = {d: {"rate": 1.0} for d in DOMAINS}
    runs = [{"target": "cybersecurity", "method": "npo", "scope": "lora", "kind": kind,
             "refusal": rates(*r)}
            for kind, r in [("unlearned", (0.0, 0.0)),
                            ("contained", (contained_rates["target"], contained_rates["others"]))]]
    sim = torch.eye(7).expand(3, 7, 7)
    a = analyse(runs, organism, sim, {"early": [1], "late": [2]}, Options())
    (c,) = a["containment"]
    assert c["spread_unlearned"] == 1.0
    assert c["spread_contained"] == pytest.approx(1.0 - contained_rates["others"])
    assert c["target_compliance_cost"] == contained_rates["target"]
    assert a["claims"]["containment"]["holds_in"] == int(holds)
    assert a["claims"]["containment"]["of"] == 1
