"""End to end: the unlearning-traces study on SmolLM2 with one concept, one scored layer, two
questions, short answers and one training step per run (about a minute on 2 cores). Checked
against independent computations: every reported BLEU is recomputed from the stored answers,
Needle's change lands entirely on its vector (share 1, every other weight bit for bit), and a
second run resumes from the cache with the same numbers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import experiments.unlearning_traces as U
from interp import models
from interp.concepts import parametric as P
from interp.judges import bleu
from interp.studies import StudyConfig

SMALL = dict(concepts=["Poland"], n_questions=2, n_unrelated=2, n_completions=1, max_new_tokens=6,
             knowledge_threshold=0.0, layers=[20], n_locator_texts=2, n_projection_candidates=1,
             n_activation_candidates=0, sigmas=[1.0], methods=["ga", "needle"], scopes=["mlp_out"],
             steps=1, batch_size=1, chunk_tokens=32, top_k=50, jb_questions=1,
             context_chars=200)


@pytest.fixture(scope="module")
def raw_model():
    return models.load(models.DEFAULT_MODEL, device="cpu", processing=False)


def test_needle_run_changes_only_the_value_vector(raw_model):
    concept = U.load_concepts(["Poland"])[0]
    retain = U.load_concepts(["Italy"])[0]
    opts = replace(U.Options(), steps=1, batch_size=1, chunk_tokens=32)
    before = P.parameter_snapshot(raw_model)
    layer, index = 20, 7
    try:
        U.run_method(raw_model, concept, retain, "needle", "needle", (layer, index), 1e-2, opts, 0)
        name = f"blocks.{layer}.mlp.W_out"
        for n, p in raw_model.named_parameters():
            if n != name:
                assert torch.equal(p.detach(), before[n]), n
        w = dict(raw_model.named_parameters())[name].detach()
        rows = [i for i in range(w.shape[0]) if i != index]
        assert torch.equal(w[rows], before[name][rows])
        assert not torch.equal(w[index], before[name][index])
        assert P.vector_change_share(before, raw_model, layer, index)["share"] == pytest.approx(1.0)
    finally:
        U.restore(raw_model, before)
    for n, p in raw_model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_study_end_to_end_and_resume(tmp_path):
    config = StudyConfig(model=models.DEFAULT_MODEL, device="cpu", out=tmp_path)
    res = U.run(config, **SMALL)
    path = tmp_path / U.STUDY / models.DEFAULT_MODEL / "results.json"
    stored = json.loads(path.read_text())
    assert stored["knowledge"]["run"] == ["Poland"]
    loc = stored["located"]["Poland"]
    assert loc["vector"][0] == 20 and loc["n_scored"] == raw_model_d_mlp()
    assert len(stored["validation_table"]) == 1 and stored["validation_table"][0]["sigma"] == 1.0

    runs = {(r["method"], r["scope"]): r for r in stored["runs"]}
    assert set(runs) == {("ga", "mlp_out"), ("needle", "needle")}
    originals = {k: v for k, v in res["runs"][0]["answers"].items()}  # shape check below
    assert set(originals) >= {"target", "completion", "unrelated", "jb_in_context", "jb_knows_all"}
    for r in stored["runs"]:
        # BLEU recomputed from the stored answers against the stored original answers
        for kind, got in r["answers"].items():
            ref = _original(tmp_path)[kind]
            mean = sum(bleu(a, b) for a, b in zip(got, ref)) / len(got)
            assert r["similarity"][kind]["bleu"] == pytest.approx(mean, abs=1e-9)
        assert r["recovery"]["jb_in_context"] == pytest.approx(
            r["similarity"]["jb_in_context"]["bleu"] - r["similarity"]["target"]["bleu"])
        assert -1.0 <= r["trace"]["cosine"] <= 1.0
    assert runs["needle", "needle"]["change"]["share"] == pytest.approx(1.0)
    assert runs["ga", "mlp_out"]["change"]["share"] < 1.0
    head = {(h["method"], h["scope"]): h for h in stored["headline"]}
    assert head["ga", "mlp_out"]["cosine"] == pytest.approx(runs["ga", "mlp_out"]["trace"]["cosine"])
    for stem in ("drop_vs_change", "cosine_by_method", "projection_tokens"):
        assert (path.parent / f"{stem}.html").exists()

    again = U.run(config, **SMALL)
    assert "run/Poland/ga/mlp_out" in again["reused_from_cache"]
    assert again["headline"] == res["headline"]


def raw_model_d_mlp() -> int:
    return 1536  # SmolLM2-135M's d_mlp, one scored layer


def _original(tmp_path):
    """The original answers, read back from the study's cache (what the runs were judged against)."""
    entries = list((tmp_path / U.STUDY / models.DEFAULT_MODEL / "cache").glob("*/original__Poland.pt"))
    assert len(entries) == 1
    return torch.load(entries[0], weights_only=False)
