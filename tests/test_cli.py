"""The `interp` command: listing models, the study registry, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from interp import cli, models, studies


def test_models_command_lists_embedded_models(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name in models.EMBEDDED_MODELS:
        assert name in out
    assert "installed" in out and "cached" in out


def test_demo_is_registered_and_has_the_common_options(capsys):
    assert "demo" in studies.available()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "demo", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--device", "--dtype", "--out", "--seed", "--prompt"):
        assert option in out


@pytest.mark.parametrize("name", sorted(studies.available()))
def test_every_study_prints_its_help(name, capsys):
    # argparse formats help strings with %, so a bare "70%" in an option's text broke --help
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", name, "--help"])
    assert exit_.value.code == 0
    assert "--seed" in capsys.readouterr().out


def test_unknown_study_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "no-such-study"])
    assert exit_.value.code == 2
    assert "demo" in capsys.readouterr().err  # the choices are listed


def test_unknown_study_in_the_library_lists_known_ones():
    with pytest.raises(KeyError, match="Known studies: .*demo"):
        studies.get("no-such-study")


def test_unknown_model_exits_2_with_the_known_names(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "interp.cli", "run", "demo", "--model", "nope", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Unknown model 'nope'" in proc.stderr and models.DEFAULT_MODEL in proc.stderr



def test_torch_threads_sets_and_restores_the_thread_count():
    import torch

    from interp.studies import torch_threads

    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(before + 1):
            raise RuntimeError("the count is restored on errors too")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
