"""The study helpers: options dataclasses as the command line, and `StudyRun`'s opening,
resume cache and results."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from interp import studies
from interp.studies import StudyConfig, StudyInputError, StudyRun, option, options_parser


@dataclass
class Opts:
    n: int = option(4, "how many", minimum=1)
    rate: float = option(0.5, "a rate")
    name: str = option("abc", "a name", choices=("abc", "xyz"))
    layers: list[int] | None = option(None, "layers")
    widths: tuple[int, ...] = option((1, 2), "widths")
    generate: bool = option(True, "turn generation off", negate="--no-generate")
    verbose: bool = option(False, "talk more")
    path: Path | None = option(None, "a file")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    options_parser(Opts)(parser)
    return parser.parse_args(argv)


def test_the_parser_defaults_are_the_dataclass_defaults():
    assert Opts(**vars(parse([]))) == Opts()


def test_the_parser_reads_every_kind_of_field():
    args = parse(["--n", "7", "--rate", "0.25", "--name", "xyz", "--layers", "3", "5",
                  "--widths", "8", "--no-generate", "--verbose", "--path", "f.json"])
    assert Opts(**vars(args)) == Opts(n=7, rate=0.25, name="xyz", layers=[3, 5], widths=[8],
                                      generate=False, verbose=True, path=Path("f.json"))


def test_the_parser_refuses_values_below_the_minimum_and_unknown_choices(capsys):
    with pytest.raises(SystemExit):
        parse(["--n", "0"])
    assert "--n must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--name", "nope"])


def test_a_python_call_below_the_minimum_is_a_clear_error(tmp_path):
    with pytest.raises(StudyInputError, match="n must be >= 1, got 0"):
        StudyRun("s", StudyConfig(out=tmp_path), Opts(n=0))


def test_cached_units_are_reused_by_a_rerun_with_the_same_settings(tmp_path):
    calls = []

    def unit(value):
        calls.append(value)
        return {"x": torch.tensor([value])}

    run = StudyRun("s", StudyConfig(out=tmp_path, model="tiny-llama"), Opts(), ignore=("verbose",))
    assert run.cached("a", lambda: unit(1))["x"].item() == 1
    again = StudyRun("s", StudyConfig(out=tmp_path, model="tiny-llama"), Opts(verbose=True),
                     ignore=("verbose",))
    assert again.key == run.key  # an ignored option does not change the key
    assert again.cached("a", lambda: unit(2))["x"].item() == 1
    assert calls == [1] and again.loaded == ["a"]


def test_other_settings_never_read_an_earlier_entry(tmp_path):
    base = StudyRun("s", StudyConfig(out=tmp_path, model="tiny-llama"), Opts())
    base.cached("a", lambda: 1)
    for other in (StudyRun("s", StudyConfig(out=tmp_path, model="tiny-llama"), Opts(n=5)),
                  StudyRun("s", StudyConfig(out=tmp_path, model="tiny-llama", seed=1), Opts())):
        assert other.key != base.key
        assert other.cached("a", lambda: 2) == 2 and other.loaded == []


def test_a_corrupt_cache_entry_is_recomputed(tmp_path):
    run = StudyRun("s", StudyConfig(out=tmp_path, model="tiny-llama"), Opts())
    (run.cache_dir / "a.pt").write_bytes(b"not a torch file")
    assert run.cached("a", lambda: 3) == 3 and run.loaded == []
    assert torch.load(run.cache_dir / "a.pt") == 3


def test_finish_writes_config_options_and_timings(tmp_path):
    run = StudyRun("s", StudyConfig(out=tmp_path, model="tiny-llama"), Opts(n=2))
    with run.timer("stage"):
        pass
    written = run.finish({"value": torch.tensor(1.5), "timings_s": {"own": 1.0}})
    on_disk = json.loads((tmp_path / "s" / "tiny-llama" / "results.json").read_text())
    assert on_disk["value"] == 1.5 and written["value"].item() == 1.5
    assert on_disk["options"]["n"] == 2 and on_disk["options"]["widths"] == [1, 2]
    assert on_disk["config"]["model"] == "tiny-llama" and on_disk["cache_key"] == run.key
    assert {"own", "stage", "total", "total_cpu"} <= set(on_disk["timings_s"])


def test_an_unwritable_output_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StudyInputError, match="cannot create the output directory .*--out"):
        StudyConfig(out=blocker).out_dir("s")


def test_fingerprint_is_stable_and_order_free():
    assert studies.fingerprint({"a": 1, "b": [2]}) == studies.fingerprint({"b": [2], "a": 1})
    assert studies.fingerprint({"a": 1}) != studies.fingerprint({"a": 2})


def test_quick_shrinks_only_the_options_left_at_their_defaults():
    @dataclass
    class Opts:
        n: int = option(50, "items")
        sigmas: tuple[float, ...] = option((0.1, 0.3), "scales")
        quick: bool = option(False, "small")

    table = {"n": 3, "sigmas": (1.0,)}
    assert studies.with_quick(Opts(quick=True), table) == Opts(n=3, sigmas=(1.0,), quick=True)
    # an option given explicitly stays; the others still shrink
    assert studies.with_quick(Opts(sigmas=(0.3, 10.0), quick=True), table) == Opts(
        n=3, sigmas=(0.3, 10.0), quick=True)
    with pytest.raises(ValueError, match=r"names options \['typo'\] that Opts lacks"):
        studies.with_quick(Opts(), {"typo": 1})
