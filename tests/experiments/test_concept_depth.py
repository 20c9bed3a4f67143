"""End to end: `interp run concept-depth --dataset FILE ...` on a tiny model and a tiny CSV.

The tiny model gets a word-level tokenizer. The label is the last word of each text ("good" /
"bad"), so the last token's embedding alone decides it: the probe must be perfect from depth 0
on, and the concept decodable at depth 0 in every condition (noise goes at the front, rounding
does not move embeddings far enough to matter)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from interp import cli, models, plots
from interp.concepts.datasets import DatasetError, load_table

WORDS = "the a cat dog sat ran on mat big small red blue".split()


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2}
    for word in WORDS + ["good", "bad", "aaathe", "bbbthe", "aaaa", "bbba"] + [f"aaa{w}" for w in WORDS] + [f"bbb{w}" for w in WORDS]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<unk>", eos_token="<bos>")
    fast.save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


@pytest.fixture
def tiny_with_tokenizer(tmp_path, monkeypatch):
    tokenizer = _tokenizer(tmp_path)
    real_load = models.load

    def load(name, **kwargs):
        model = real_load("tiny-llama", **kwargs)
        model.set_tokenizer(tokenizer, default_padding_side="right")
        return model

    import experiments.concept_depth as study

    monkeypatch.setattr(study.models, "load", load)
    return load


def _csv(tmp_path, n=48):
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        lines.append(f"{words} {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}")
    path = tmp_path / "toy.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_generic_dataset_runs_the_whole_study(tmp_path, tiny_with_tokenizer, capsys):
    data = _csv(tmp_path)
    out = tmp_path / "out"
    argv = ["run", "concept-depth", "--model", "tiny-llama", "--dataset", str(data),
            "--text-col", "text", "--label-col", "label", "--positive", "pos", "--n-examples", "0",
            "--cv-folds", "4", "--conditions", "none", "noise", "int8", "--out", str(out)]
    assert cli.main(argv) == 0
    out_dir = out / "concept-depth" / "tiny-llama"
    results = json.loads((out_dir / "results.json").read_text())
    assert results["n_layers"] == 2
    entry = results["datasets"]["toy"]
    assert entry["n"] == 48 and entry["counts"] == [24, 24] and entry["label_names"] == ["neg", "pos"]
    for condition in ("none", "noise", "int8"):
        run = entry["conditions"][condition]
        assert run["layers"] == [0, 1, 2] and len(run["accuracy"]) == len(run["auc"]) == 3
        assert run["accuracy"][0] == 1.0  # the last token's embedding gives the label away
        assert run["depth"]["layer"] == 0 and run["depth"]["relative"] == 0.0
        rng = run["depth_range"]
        assert (rng["low"], rng["depth"], rng["high"]) == (0, 0, 0) and rng["z"] == 1.0
        assert run["chance"] == 0.5 and run["split"] == {"kind": "cv", "folds": 4, "seed": 0}
    assert entry["conditions"]["noise"]["example"][:3] in ("aaa", "bbb")
    assert results["settings"]["probe"]["cv_folds"] == 4
    for stem in ("curves", "curves_toy", "relative_depth"):
        assert "plotly" in (out_dir / f"{stem}.html").read_text().lower()
        if plots.find_chromium():
            assert (out_dir / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "concept-depth" / "relative_depth_models.html").exists()
    printed = capsys.readouterr().out
    assert "Concept depth on tiny-llama" in printed and "toy" in printed
    assert "Depth range" in printed and "0-0 (0.00-0.00)" in printed

    # A second run with the same settings resumes from the saved per-condition results.
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("loaded from") == 3
    again = json.loads((out_dir / "results.json").read_text())
    assert again["datasets"]["toy"]["conditions"]["none"]["accuracy"] == entry["conditions"]["none"]["accuracy"]

    # Summary settings (the threshold fraction, the range's z) recompute nothing either.
    assert cli.main(argv + ["--fraction", "0.8", "--range-z", "2"]) == 0
    assert capsys.readouterr().out.count("loaded from") == 3
    again = json.loads((out_dir / "results.json").read_text())
    assert again["settings"]["fraction"] == 0.8
    assert again["datasets"]["toy"]["conditions"]["none"]["depth_range"]["z"] == 2.0


def test_rounding_changes_weights_by_the_expected_amount():
    from experiments.concept_depth import round_weights

    model = models.load("tiny-llama", processing=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    round_weights(model, "int8")
    for name, param in model.named_parameters():
        diff = (param - before[name]).abs()
        if name.endswith(("W_Q", "_W_K", "_W_V", "W_O", "W_in", "W_gate", "W_out")):
            axes = (0, 1) if name.endswith("W_O") else (1,) if ".attn." in name else (0,)
            step = before[name].abs().amax(dim=axes, keepdim=True) / 127
            assert (diff <= step / 2 + 1e-7).all() and diff.max() > 0
            levels = param / step  # every entry is an integer multiple of its channel's step
            assert torch.allclose(levels, levels.round(), atol=1e-3)
        else:
            assert torch.equal(param, before[name])  # embeddings, norms, biases untouched
    model = models.load("tiny-llama", processing=False)
    round_weights(model, "bf16")
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name].to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="unknown precision"):
        round_weights(model, "int4")


def test_missing_column_is_reported(tmp_path, tiny_with_tokenizer, capsys):
    data = _csv(tmp_path)
    assert cli.main(["run", "concept-depth", "--model", "tiny-llama", "--dataset", str(data),
                     "--text-col", "sentence", "--label-col", "label", "--out", str(tmp_path / "o")]) == 2
    assert "text column 'sentence' is missing" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="text column 'sentence' is missing"):
        load_table(data, "sentence", "label")
