"""What every `fewstep` command shares: the parser class whose usage errors are one line, typed
numeric options, `--import MODULE`, and the options of commands that read a checkpoint.

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

CHECKPOINT_HELP = "a run folder, its checkpoints/ folder, or a ckpt-*.json file"


def one_line(text: object) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------
# The parser: usage errors are user errors like any other


class UsageError(ValueError):
    """A command line argparse refused; `prog` names the (sub)command."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises `UsageError` instead of printing the usage and exiting, so
    that `fewstep.cli.main` reports it as one line with exit code 2, as every other user error.
    Subparsers are of the same class (argparse makes them with the parent's type)."""

    def error(self, message: str):
        raise UsageError(self.prog, f"{message}; see `{self.prog} --help`")


def command(sub, name: str, *, help: str, description: str, epilog: str) -> Parser:
    """A subcommand with its examples shown as written under `--help`."""
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def checkpoint_command(sub, name: str, *, help: str, description: str, epilog: str) -> Parser:
    """A subcommand whose first argument is a checkpoint, and that takes `--import`."""
    p = command(sub, name, help=help, description=description, epilog=epilog)
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    add_import(p)
    return p


# ----------------------------------------------------------------------------------------------
# Numeric options: checked when parsed, so that `--steps 0` is an error, not a default


def count(minimum: int = 1):
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # how argparse names the type in its messages
    return parse


def counts(minimum: int = 1):
    """An argparse type: comma-separated integers, each >= `minimum` (e.g. `--steps 1,2,4`)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("needs at least one integer")
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(f"each value must be >= {minimum}, got {text!r}")
        return values

    parse.__name__ = f"integers >= {minimum}"
    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False):
    """An argparse type: a finite float, >= `low` (> `low` when `low_open`) and <= `high`."""
    bounds = " and ".join(b for b in ((f"{'>' if low_open else '>='} {low:g}" if low is not None else ""),
                                       (f"<= {high:g}" if high is not None else "")) if b)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        ok = math.isfinite(value) and (high is None or value <= high)
        if low is not None:
            ok = ok and (value > low if low_open else value >= low)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + bounds if bounds else ''}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def comma_list(text: str) -> list[str]:
    """An argparse type: comma-separated names (e.g. `--sampler heun,euler`)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"needs at least one name, got {text!r}")
    return names


def add_sampling(p, *, batch_size: int = 256) -> None:
    """Options of every command that samples a checkpoint."""
    p.add_argument("--batch-size", type=count(1), default=batch_size,
                   help=f"sampling batch size (default {batch_size})")
    p.add_argument("--seed", type=count(0), default=0, help="seed of the noise (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights, not the EMA")


# ----------------------------------------------------------------------------------------------
# --import MODULE: a user's registered networks and methods


IMPORT_HELP = ("import a Python module (a name on the import path, or path/to/file.py) before the checkpoint is "
               "loaded, so that its @fewstep.networks.register_network / @fewstep.methods.register_method "
               "classes are known; repeatable. Checkpoints never import anything by themselves")


def add_import(p) -> None:
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)


class ImportModuleError(ValueError):
    """A module given with `--import` that could not be imported."""


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _module_from_file(spec: str):
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise ImportModuleError(f"--import {spec}: no such file")
    name = path.stem if path.stem.isidentifier() else "module"
    known = sys.modules.get(name)
    if known is not None:
        if Path(getattr(known, "__file__", "") or "").resolve() == path:
            return known  # the same file, imported already: its classes are registered
        name = f"{name}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"  # never shadow another module
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportModuleError(f"--import {spec}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # as for a script: its sibling modules import
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _module_by_name(spec: str):
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # `fewstep --import mynets` finds ./mynets.py, as `python -m` would
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and (spec == e.name or spec.startswith(e.name + ".")):
            raise ImportModuleError(f"--import {spec}: no module named {e.name!r} on the import path "
                                    f"(give an importable module name or a path/to/file.py)") from None
        raise


def import_modules(specs) -> list:
    """Import each `--import` module (a dotted name, or a path to a .py file), in order."""
    modules = []
    for spec in specs:
        try:
            modules.append(_module_from_file(spec) if _is_path(spec) else _module_by_name(spec))
        except ImportModuleError:
            raise
        except Exception as e:  # the module itself raised: name it, and what it raised, on one line
            raise ImportModuleError(f"--import {spec} failed: {type(e).__name__}: {one_line(e)} "
                                    f"(FEWSTEP_DEBUG=1 shows the traceback)") from e
    return modules
