"""The `interp` command.

    interp models                      embedded models: installed? converted and cached?
    interp run <study> [options]       run a registered study (see `interp run --help`)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from interp import models, studies
from interp.concepts.datasets import DatasetError
from interp.tasks import PairsFileError

#: The library's errors whose message names the bad input and the fix. The command prints them
#: as one line (`interp: <message>`) and exits 2; any other exception is a bug and keeps its
#: traceback.
INPUT_ERRORS: tuple[type[Exception], ...] = (
    models.ModelLoadError, studies.StudyInputError, DatasetError, PairsFileError)


class Parser(argparse.ArgumentParser):
    """argparse's parser, reporting a bad command line as one line (`interp: <problem>; see
    `<command> --help``) with exit status 2, instead of the usage block and the problem."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"interp: {one_line(message)}; see `{self.prog} --help`\n")


def one_line(message: str) -> str:
    """`message` with its line breaks (and runs of spaces) folded into single spaces."""
    return " ".join(str(message).split())


def _cmd_models(_: argparse.Namespace) -> int:
    print(f"{'model':<24}{'installed':<11}{'cached':<8}description")
    for s in models.list_models():
        print(f"{s.name:<24}{'yes' if s.installed else 'no':<11}{'yes' if s.cached else 'no':<8}"
              f"{s.description}{'' if s.installed else f'  [install: {s.install_command}]'}")
    print(f"\ndefault: {models.DEFAULT_MODEL}; cache: {models.cache_dir()} (set INTERP_CACHE_DIR)")
    print(f"tiny test models: {', '.join(models.TINY_MODELS)}")
    print(f"also accepted: {models.ACCEPTED_FORMS}")
    return 0


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=models.DEFAULT_MODEL,
                        help=f"model name or path (default {models.DEFAULT_MODEL}; see `interp models`)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default float32)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="results root; the study writes <out>/<study>/<model>/ (default results)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="interp", description="Mechanistic-interpretability workbench.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the embedded models").set_defaults(func=_cmd_models)
    run = sub.add_parser("run", help="run a study")
    study_parsers = run.add_subparsers(dest="study", required=True, metavar="<study>")
    for name in studies.available():
        try:
            module = studies.get(name)
        except ImportError as exc:  # a broken study must not break the whole command
            print(f"interp: study {name!r} could not be imported: {exc}", file=sys.stderr)
            continue
        p = study_parsers.add_parser(name, help=getattr(module, "DESCRIPTION", ""),
                                     description=getattr(module, "DESCRIPTION", ""))
        _common_options(p)
        if hasattr(module, "add_arguments"):
            module.add_arguments(p)
        p.set_defaults(func=_cmd_run)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    module = studies.get(args.study)
    common = {"model", "device", "dtype", "out", "seed"}
    config = studies.StudyConfig(**{k: getattr(args, k) for k in common})
    options = {k: v for k, v in vars(args).items() if k not in common | {"command", "study", "func"}}
    module.run(config, **options)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except INPUT_ERRORS as exc:
        print(f"interp: {one_line(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
