"""The bad-input catalogue: what a user sees for each kind of bad input.

At the command line every entry must give exit status 2 and exactly one line on stderr,
`interp: <message>`, naming what was wrong and how to fix it, and no traceback. Library calls
raise the error type the command line reports (`ModelLoadError`, `StudyInputError`,
`DatasetError`, `PairsFileError`, or a `ValueError` naming the bad name and the known ones).
The catalogue is listed, with the messages, in the README ("Bad input").

Most entries fail before a model is loaded. Those that need a tokenizer use the tiny chat model
(`tiny_chat_model_dir`); the corrupt-cache entry rebuilds a copy of the default model's cache
entry (a dequantisation, ~40 s).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from interp import cli, hooks, models, studies
from interp.attribution.patching import exact_patching
from interp.attribution.sites import family
from interp.concepts.datasets import DatasetError, load_table
from interp.tasks import PairsFileError, load_pairs

IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`interp <argv>` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *phrases: str) -> str:
    """Exit status 2; stderr ends with one `interp: ...` line (progress bars of a model load may
    come before it) holding every phrase; no traceback. Returns the line."""
    lines = [line for line in err.splitlines() if line.startswith("interp:")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


# --------------------------------------------------------------------------------------------
# Unknown names
# --------------------------------------------------------------------------------------------


def test_unknown_study(capsys):
    line = assert_one_line(*run_cli(["run", "no-such-study"], capsys),
                           "invalid choice: 'no-such-study'", "interp run --help")
    for name in studies.available():
        assert name in line  # the known studies are listed


def test_unknown_model(capsys, out):
    assert_one_line(*run_cli(["run", "demo", "--model", "nope", "--out", str(out)], capsys),
                    "Unknown model 'nope'", models.DEFAULT_MODEL, "Accepted forms")


def test_unknown_option_value(capsys, out):
    assert_one_line(*run_cli(["run", "demo", "--dtype", "float8", "--out", str(out)], capsys),
                    "argument --dtype: invalid choice: 'float8'", "bfloat16", "--help")


def test_unknown_site_family(random_pairs):
    with pytest.raises(ValueError, match=r"Unknown site family 'nope'; known: resid, .*heads"):
        family("nope")
    model = models.load("tiny-llama")
    clean, corrupt, metric = random_pairs(model)
    with pytest.raises(ValueError, match=r"Unknown site family 'atn'; known: .*attn"):
        exact_patching(model, clean, corrupt, metric, ["atn"], progress=False)


def test_bad_hook_names_in_the_library():
    model = models.load("tiny-llama")
    with pytest.raises(ValueError, match=r"unknown hook family 'resd_pre'; known families: resid_pre"):
        hooks.hook_names(model, "resd_pre", layers=[0])
    with pytest.raises(ValueError, match=r"no hook point 'blocks.0.hook_resd_pre'; did you mean "
                                         r"'blocks.0.hook_resid_pre'"):
        hooks.hook_names(model, "blocks.0.hook_resd_pre")
    n_layers = model.cfg.n_layers
    with pytest.raises(ValueError, match=rf"layer {n_layers} is out of range: the model has "
                                         rf"n_layers={n_layers}"):
        hooks.zero_ablate(model, "resid_pre", layers=[n_layers])


def test_bad_hook_name_at_the_command_line(capsys, out, tiny_chat_model_dir):
    code, err = run_cli(["run", "sae-circuits", "--model", str(tiny_chat_model_dir), "--device",
                         "cpu", "--out", str(out), "--layers", "1", "--hook", "hook_resd_pre"],
                        capsys)
    assert_one_line(code, err, "--hook 'hook_resd_pre'", "no hook point 'blocks.1.hook_resd_pre'",
                    "did you mean 'blocks.1.hook_resid_pre'")
    code, err = run_cli(["run", "sae-circuits", "--model", str(tiny_chat_model_dir), "--device",
                         "cpu", "--out", str(out), "--layers", "1,9"], capsys)
    assert_one_line(code, err, "layers [9] out of range", "has 4 layers", "--layers takes 0..3")


# --------------------------------------------------------------------------------------------
# Counts and options
# --------------------------------------------------------------------------------------------

COUNTS = [
    # (study, flag, value, message): checked by the study's run (older studies) ...
    ("relp-ioi", "--n-pairs", "0", "n_pairs must be >= 1, got 0; pass a value >= 1 (--n-pairs)"),
    ("relp-ioi", "--ig-steps", "-2", "ig_steps must be >= 1, got -2"),
    ("demo", "--top-k", "0", "top_k must be >= 1, got 0"),
    ("concept-depth", "--n-examples", "-1", "n_examples must be >= 0, got -1"),
    ("concept-depth", "--cv-folds", "1", "cv_folds must be 0 (one hold-out split) or >= 2"),
    ("concept-depth", "--batch-size", "0", "batch_size must be >= 1"),
    ("sae-circuits", "--n-pairs", "0", "n_pairs must be >= 1, got 0"),
    ("sae-circuits", "--k", "0", "k must be >= 1, got 0"),
    ("sae-circuits", "--epochs", "0", "epochs must be > 0, got 0.0 (--epochs)"),
    ("sae-circuits", "--template", "99", "template 99 does not exist: SVA template ids are 0.."),
    ("sae-circuits", "--layers", "two,four", "--layers takes comma-separated layer numbers"),
    # ... and by the parser, for a study with an options dataclass (`option(minimum=...)`)
    ("refusal-direction", "--n-test", "-1", "argument --n-test: --n-test must be >= 1, got -1"),
    ("refusal-direction", "--n-train", "0", "argument --n-train: --n-train must be >= 1, got 0"),
]


@pytest.mark.parametrize(("study", "flag", "value", "message"), COUNTS,
                         ids=[f"{c[0]} {c[1]} {c[2]}" for c in COUNTS])
def test_bad_counts(study, flag, value, message, capsys, out):
    code, err = run_cli(["run", study, "--out", str(out), flag, value], capsys)
    assert_one_line(code, err, message)
    assert not out.exists() or not any(out.rglob("results.json"))


def test_bad_counts_in_python_calls(tmp_path):
    from experiments import refusal_direction, relp_ioi

    config = studies.StudyConfig(out=tmp_path)
    with pytest.raises(studies.StudyInputError, match=r"n_pairs must be >= 1, got 0"):
        relp_ioi.run(config, n_pairs=0)
    with pytest.raises(studies.StudyInputError, match=r"n_test must be >= 1, got -1"):
        refusal_direction.run(config, n_test=-1)
    assert not list(tmp_path.iterdir())  # nothing was started


def test_the_issue_example_in_a_subprocess(tmp_path):
    """`interp run relp-ioi --n-pairs 0` once printed a traceback."""
    proc = subprocess.run([sys.executable, "-m", "interp.cli", "run", "relp-ioi", "--n-pairs", "0",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.stderr.strip() == ("interp: n_pairs must be >= 1, got 0; pass a value >= 1 "
                                   "(--n-pairs)"), proc.stderr
    assert proc.returncode == 2 and proc.stdout == ""


def test_cuda_requested_without_a_gpu(capsys, out):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line(*run_cli(["run", "demo", "--device", "cuda", "--out", str(out)], capsys),
                    "device 'cuda' was requested but torch sees no CUDA GPU", "--device cpu")


# --------------------------------------------------------------------------------------------
# Files and directories
# --------------------------------------------------------------------------------------------


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for study in ("demo", "relp-ioi", "refusal-direction"):
        code, err = run_cli(["run", study, "--out", str(blocker / "results")], capsys)
        assert_one_line(code, err, f"cannot create the output directory {blocker / 'results'}",
                        "Not a directory", "pass --out with a writable directory")


def _pairs_file(tmp_path: Path, name: str, header: str, *rows: str) -> Path:
    path = tmp_path / f"{name}.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_pairs_files(capsys, out, tmp_path, tiny_chat_model_dir):
    model_dir = str(tiny_chat_model_dir)
    base = ["run", "relp-ioi", "--model", model_dir, "--device", "cpu", "--out", str(out), "--pairs"]
    header = "clean,corrupt,answer,wrong_answer"

    missing = _pairs_file(tmp_path, "missing", "clean,corrupt", f'"{IOI}","{IOI_CORRUPT}"')
    assert_one_line(*run_cli([*base, str(missing)], capsys),
                    "is missing column(s) ['answer', 'wrong_answer']", "it has ['clean', 'corrupt']",
                    "Required: ['clean', 'corrupt', 'answer', 'wrong_answer']")

    multi = _pairs_file(tmp_path, "multi", header,
                        f'"{IOI}","{IOI_CORRUPT}", Maryland and Virginia, John')
    assert_one_line(*run_cli([*base, str(multi)], capsys),
                    "row 1 (line 2): answer ' Maryland and Virginia' is not a single token",
                    "[' Maryland', ' and', ' Virginia']", "--skip-invalid")

    shorter = IOI_CORRUPT.replace("Mary and John went", "Mary went")  # two words fewer
    unequal = _pairs_file(tmp_path, "unequal", header, f'"{IOI}","{shorter}", Mary, John')
    line = assert_one_line(*run_cli([*base, str(unequal)], capsys), "row 1 (line 2): clean has")
    n_clean, n_corrupt = map(int, re.search(r"clean has (\d+) tokens but corrupt has (\d+)",
                                            line).groups())
    assert n_clean - n_corrupt == 2  # " and", " John"

    assert_one_line(*run_cli([*base, str(unequal), "--skip-invalid"], capsys),
                    "all 1 rows are invalid")
    assert_one_line(*run_cli([*base, str(tmp_path / "nope.csv")], capsys),
                    f"pairs file not found: {tmp_path / 'nope.csv'}")
    assert not list(out.rglob("results.json"))

    model = models.load(model_dir, device="cpu")
    with pytest.raises(PairsFileError, match="missing column"):
        load_pairs(missing, model)


def test_concept_data_set_with_one_class(capsys, out, tmp_path):
    data = tmp_path / "one-class.csv"
    data.write_text("text,label\nthe cat sat,pos\nthe dog ran,pos\na bird sang,pos\n")
    base = ["run", "concept-depth", "--out", str(out), "--dataset", str(data)]
    assert_one_line(*run_cli([*base, "--text-col", "text", "--label-col", "label"], capsys),
                    "every row has the label 'pos' in column 'label', so there is one class only",
                    "a probe needs examples of both classes")
    assert_one_line(*run_cli([*base, "--text-col", "text"], capsys),
                    "--dataset needs --text-col and --label-col")
    assert_one_line(*run_cli([*base, "--text-col", "words", "--label-col", "label"], capsys),
                    "the text column 'words' is missing", "columns there: ['text', 'label']")
    with pytest.raises(DatasetError, match="one class only"):
        load_table(data, "text", "label", label_map={"pos": 1})


# --------------------------------------------------------------------------------------------
# The Hub and the model cache
# --------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_name_without_network_fails_within_seconds(capsys, out, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # nothing listens
    t0 = time.perf_counter()
    code, err = run_cli(["run", "demo", "--model", "no-such-org/no-such-model", "--out", str(out)],
                        capsys)
    assert time.perf_counter() - t0 < 10
    assert_one_line(code, err, "Could not reach the Hugging Face Hub", "'no-such-org/no-such-model'",
                    "Offline, use one of the embedded models", models.DEFAULT_MODEL)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line(*run_cli(["run", "demo", "--model", "no-such-org/no-such-model", "--out",
                              str(out)], capsys),
                    "HF_HUB_OFFLINE is set", "a local .gguf file")


def test_corrupt_model_cache_is_rebuilt(tmp_path, monkeypatch, default_model):
    """A truncated weights file in the conversion cache (a full disk, a copy cut short) is
    detected, the entry converted again, and the model loads with the right weights. Works on a
    copy of the cache entry (without its weights) under a temporary INTERP_CACHE_DIR."""
    (entry,) = [p.parent for p in (models.cache_dir() / "converted").glob("*/source.txt")
                if p.read_text().startswith(f"{models.DEFAULT_MODEL}-")]
    copy = tmp_path / "cache" / "converted" / entry.name
    copy.mkdir(parents=True)
    for name in ("config.json", "source.txt", "done"):
        shutil.copy(entry / name, copy / name)
    shutil.copytree(entry / "tokenizer", copy / "tokenizer")
    weights = (entry / "weights-processed.safetensors").read_bytes()
    (copy / "weights-processed.safetensors").write_bytes(weights[: len(weights) // 3])
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path / "cache"))

    with pytest.warns(UserWarning, match=r"cached conversion .* cannot be read .*converting the "
                                         r"model again"):
        model = models.load(models.DEFAULT_MODEL, device="cpu")
    assert (copy / "weights-processed.safetensors").stat().st_size == len(weights)
    tokens = default_model.to_tokens(IOI)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), default_model(tokens), rtol=0, atol=1e-5)
