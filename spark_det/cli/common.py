"""What every spark-det command shares: parser conventions, the ``--output`` flag, exit codes.

Conventions: ``--output`` names what a command writes (a file or a run folder); every argument
has help text and ``choices`` where there are choices; a user error ends in one ``error:``
line on stderr and the exit code of :mod:`spark_det.errors`, never in a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Iterable, Optional, Sequence

from ..errors import (
    EXIT_CANNOT_WRITE,
    EXIT_INTERRUPTED,
    MissingPackageError,
    SparkDetError,
    data_warnings_as_lines,
    first_line,
)

EXIT_CODES_HELP = ("exit codes: 0 ok, 1 bad input file, 2 bad arguments/config/data, 3 training diverged, "
                   "4 file-system error (e.g. cannot write output), 5 run folder in use by another run, "
                   "6 distributed rendezvous timed out, 7 a needed package is not installed, "
                   "8 the leak audit found masked patches reaching visible features, 130 interrupted, "
                   "143 stopped by SIGTERM after a checkpoint")

_DETECTRON2 = ("install Detectron2 (not on PyPI: `make setup` installs it, or see the README's setup section) "
               "and pip install 'spark-det[d2]'")
_MMDET = "pip install 'spark-det[mmdet]' (mmcv needs its compiled ops: `make setup` builds them, see the README)"
# The optional packages (setup.cfg's extras and the detection frameworks) -> how to install them.
INSTALL_HINTS = {
    "pycocotools": "pip install 'spark-det[demo]'", "matplotlib": "pip install 'spark-det[demo]'",
    "detectron2": _DETECTRON2, "fvcore": _DETECTRON2, "iopath": _DETECTRON2, "yacs": _DETECTRON2,
    "omegaconf": _DETECTRON2, "hydra": _DETECTRON2,
    "mmdet": _MMDET, "mmcv": _MMDET, "mmengine": _MMDET,
}


def missing_package(exc: ImportError) -> Optional[MissingPackageError]:
    """The one-line error for an optional package that is not installed (None for any other
    module: a missing core dependency is a broken install, and its traceback is the report)."""
    name = (exc.name or "").split(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or name not in INSTALL_HINTS:
        return None
    return MissingPackageError(f"the package {name} is not installed: {INSTALL_HINTS[name]}")


def require_packages(modules: Iterable[str], command: str) -> None:
    """Import ``modules`` now, before any work, so that a missing one is one line at once, not a
    failure minutes into a run; each is named with how to install it."""
    problems = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            absent = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == module
            state = "" if absent else f"installed but fails to import: {first_line(exc)}; "
            problems.append(f"{module} ({state}{INSTALL_HINTS[module]})")
    if problems:
        raise MissingPackageError(f"{command} needs packages that are missing: {'; '.join(problems)}")


def make_parser(prog: str, doc: Optional[str]) -> argparse.ArgumentParser:
    """A parser whose help shows the command's docstring (usage examples) and the exit codes."""
    return argparse.ArgumentParser(prog=prog, description=doc, epilog=EXIT_CODES_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output(parser: argparse.ArgumentParser, help: str, positional: Optional[str] = None,
               default: Optional[str] = None) -> None:
    """``--output`` (``-o``); with ``positional`` the output may also be given as that positional
    argument (the form earlier versions documented), e.g. ``convert SRC DST``."""
    parser.add_argument("-o", "--output", default=None, help=help + (f" (default: {default})" if default else ""))
    if positional:
        parser.add_argument(positional, nargs="?", default=None, help="same as --output")
    parser.set_defaults(_output_positional=positional, _output_default=default)


def parse_with_output(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                      intermixed: bool = False) -> argparse.Namespace:
    """Parse ``argv``; ``args.output`` is then the output from ``--output`` or the positional form
    (exactly one of them) or the default, and is required."""
    args = parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    name, default = args.__dict__.pop("_output_positional"), args.__dict__.pop("_output_default")
    positional = args.__dict__.pop(name) if name else None
    if positional and args.output and positional != args.output:
        parser.error(f"give the output once: {name.upper()} or --output, not both")
    args.output = args.output or positional or default
    if not args.output:
        parser.error("the output is required: --output PATH")
    return args


def run_tool(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a command's ``main`` and turn user errors into one line and an exit code."""
    try:
        with data_warnings_as_lines():
            return main(argv)
    except SparkDetError as exc:
        if not getattr(exc, "reported_by_main", False):  # under torchrun the main rank says it once
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:  # an optional package (an extra, a framework) is not installed
        missing = missing_package(exc)
        if missing is None:
            raise
        print(f"error: {missing}", file=sys.stderr)
        return missing.exit_code
    except OSError as exc:  # a full disk, a read-only folder, a vanished mount: the user's to fix
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_CANNOT_WRITE
