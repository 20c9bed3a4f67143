"""End to end: `interp run ioi-circuit --quick` on a tiny random Llama with the default model's
tokenizer, its numbers recomputed independently from the saved scores and a plain run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from interp import cli, models
from interp.attribution.graph import Graph
from interp.tasks import generate_ioi

pytestmark = pytest.mark.filterwarnings("ignore:No Chromium found")


def test_ioi_circuit_quick_writes_tables_figures_and_roles(tmp_path, capsys, tiny_chat_model_dir):
    argv = ["run", "ioi-circuit", "--model", str(tiny_chat_model_dir), "--device", "cpu", "--out",
            str(tmp_path), "--quick", "--last-layers", "1", "--circuit-edges", "12"]
    assert cli.main(argv) == 0
    (out_dir,) = (tmp_path / "ioi-circuit").iterdir()
    results = json.loads((out_dir / "results.json").read_text())
    for stem in ("circuit", "faithfulness", "scatter_exact"):
        assert (out_dir / f"{stem}.html").exists(), stem
    printed = capsys.readouterr().out
    assert "CPR" in printed and "circuit by" in printed

    # agreement recomputed with scipy from the saved scores
    (cache,) = (out_dir / "cache").iterdir()
    saved = {m: torch.load(cache / f"scores__{m}.pt", weights_only=False)
             for m in ("eap", "eap_ig", "relp", "exact")}
    exact = saved["exact"]
    assert len(exact) == results["exact"]["n_edges"] and exact.values.abs().max() > 0
    n_layers = exact.graph.n_layers
    assert all(n.endswith("->logits") or n.split("->")[1].startswith(f"a{n_layers - 1}.")
               for n in exact.names())  # the final layer's heads and the logits only
    for m in ("eap", "eap_ig", "relp"):
        x, y = saved[m].values[exact.ids].double().numpy(), exact.values.double().numpy()
        row = results["agreement"][m]["all"]
        assert row["pearson"] == pytest.approx(pearsonr(x, y).statistic, abs=1e-9)
        assert row["spearman"] == pytest.approx(spearmanr(x, y).statistic, abs=1e-9)

    # CPR / CMD: trapezoids over the saved curve (numpy), the curve's x the quick fractions
    for m in ("eap", "eap_ig", "relp"):
        curve = results["faithfulness"][f"{m}/abs"]
        xs, fs = np.array(curve["fractions"]), np.array(curve["faithfulness"])
        assert results["cpr_cmd"][m]["cmd"] == pytest.approx(np.trapezoid(np.abs(1 - fs), xs), abs=1e-9)
        assert results["cpr_cmd"][m]["cpr"] == pytest.approx(np.trapezoid(fs, xs), abs=1e-9)
        assert fs[-1] == pytest.approx(1.0, abs=1e-4)  # every edge kept: the clean run
    best = results["best_method"]["name"]
    assert results["cpr_cmd"][best]["cmd"] == min(r["cmd"] for r in results["cpr_cmd"].values())

    # head roles: the attention evidence equals a plain run_with_cache at the slot positions
    circuit = results["circuit"]
    assert 0 < circuit["n_edges"] <= 12 and circuit["roles"]
    model = models.load(str(tiny_chat_model_dir), device="cpu")
    pairs = generate_ioi(model, 4, seed=0)
    _, cache_ = model.run_with_cache(pairs.clean_tokens)
    rows = torch.arange(len(pairs))
    p = pairs.positions
    for role in circuit["roles"]:
        pattern = cache_[f"blocks.{role['layer']}.attn.hook_pattern"][:, role["index"]]
        assert role["attention"]["end->IO"] == pytest.approx(
            pattern[rows, p["end"], p["IO"]].mean().item(), abs=1e-6)
        assert role["attention"]["S2->S1+1"] == pytest.approx(
            pattern[rows, p["S2"], p["S1"] + 1].mean().item(), abs=1e-6)
    graph = Graph.from_model(model)
    assert results["graph"] == graph.summary()


def test_ioi_circuit_bad_options(tmp_path, tiny_chat_model_dir, capsys):
    base = ["run", "ioi-circuit", "--model", str(tiny_chat_model_dir), "--device", "cpu", "--out",
            str(tmp_path), "--quick"]
    assert cli.main(base + ["--last-layers", "99"]) == 2
    assert "last_layers is 99" in capsys.readouterr().err
    assert cli.main(base + ["--fractions", "0.5", "0.1"]) == 2
    assert "fractions must be" in capsys.readouterr().err
