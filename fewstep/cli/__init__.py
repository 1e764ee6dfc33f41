"""The `fewstep` command line, one module per command family:

    train.py      fewstep train
    sample.py     fewstep sample
    evaluate.py   fewstep eval, search-times, ref-stats
    plot.py       fewstep plot
    edit.py       fewstep edit
    diffusers.py  fewstep encode, export
    convert.py    fewstep convert (EDM / EDM2 / ECT snapshots)
    common.py     the parser, typed numeric options, --import MODULE

Each module adds its parsers (`add_parser(s)(subparsers)`) and runs a parsed command (`run*(args)`)
by calling the library; argparse lives here only. `main` reports every user error -- a bad flag,
config, path or checkpoint, a module that fails to import, training that diverged -- as one line on
stderr with exit code 2; `FEWSTEP_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

from fewstep.cli.common import Parser, UsageError, import_modules, one_line
from fewstep.cli.train import build_train_config

__all__ = ["build_parser", "build_train_config", "main"]


def build_parser() -> Parser:
    from fewstep.cli import convert, diffusers, edit, evaluate, plot, sample, train

    parser = Parser(prog="fewstep", description="Consistency models: train, sample, evaluate, edit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_parser(sub)
    sample.add_parser(sub)
    evaluate.add_parsers(sub)  # eval, search-times, ref-stats
    plot.add_parser(sub)
    edit.add_parser(sub)
    diffusers.add_parsers(sub)  # encode, export
    convert.add_parser(sub)
    return parser


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, (ValueError, FileNotFoundError)):  # ConfigError, DataError, CheckpointError, ... too
        return True
    train = sys.modules.get("fewstep.training.fit")  # not imported: training never ran, so it did not diverge
    return train is not None and isinstance(e, (train.NonFiniteLossError, train.RunStoppedError))


def main(argv: list[str] | None = None) -> int:
    """Run `fewstep <argv>` (default: the process's arguments); returns the exit code."""
    parser = build_parser()
    prog = parser.prog
    try:
        args = parser.parse_args(argv)
        prog = f"fewstep {args.command}"
        import_modules(getattr(args, "imports", ()))  # before any checkpoint or config names their classes
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not _is_user_error(e) or (os.environ.get("FEWSTEP_DEBUG") and not isinstance(e, UsageError)):
            raise
        if not getattr(e, "reported", False):  # e.g. a distributed stop, printed before torchrun's SIGTERM
            print(f"{e.prog if isinstance(e, UsageError) else prog}: error: {one_line(e)}", file=sys.stderr)
        return 2

