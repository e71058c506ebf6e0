"""The errors a user can cause, each with the exit code the command-line tools report for it.

| code | meaning                                                                     |
|------|-----------------------------------------------------------------------------|
| 0    | success                                                                     |
| 1    | a bad input file: missing, unreadable, truncated or of the wrong layout     |
| 2    | bad arguments, config or data (argparse's own usage errors are 2 as well)   |
| 3    | training diverged (non-finite loss); the last good checkpoint is kept       |
| 4    | a file-system error: an output cannot be written (read-only, full disk, ...) |
| 5    | the run folder is in use by another run (a lock held by a live process)     |
| 6    | the processes of a distributed run could not meet (rendezvous timed out)     |
| 7    | a package the command needs is not installed (the line says what to install) |
| 8    | masked patches reach visible features (the leak audit failed); no checkpoint |
|      | of the leaking weights is written                                           |
| 143  | stopped by SIGTERM (preemption) after writing a checkpoint: resume it        |
| 130  | interrupted (Ctrl-C)                                                        |

Library code raises these; :func:`spark_det.cli.common.run_tool` turns them into one ``error:``
line and the exit code, never a traceback.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

EXIT_OK = 0
EXIT_BAD_FILE = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_CANNOT_WRITE = 4
EXIT_LOCKED = 5
EXIT_NO_RENDEZVOUS = 6
EXIT_MISSING_PACKAGE = 7
EXIT_LEAKS = 8
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect
EXIT_INTERRUPTED = 130


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message: library errors (torch's above all) run to pages."""
    return (str(exc).splitlines() or [""])[0][:limit]


class SparkDetError(Exception):
    """Base of every error caused by what a user passed in."""

    exit_code = EXIT_BAD_INPUT


class InputFileError(SparkDetError, ValueError):
    """An input file (a checkpoint, an annotation file) is missing, unreadable, truncated or of an
    unexpected layout."""

    exit_code = EXIT_BAD_FILE


class CheckpointError(InputFileError):
    """A checkpoint file is missing, unreadable, truncated or of an unexpected layout."""


class ConfigError(SparkDetError, ValueError):
    """A recipe, an override or an argument is invalid."""

    exit_code = EXIT_BAD_INPUT


class DataError(SparkDetError, ValueError):
    """The data source holds no usable images (or too few for one batch)."""

    exit_code = EXIT_BAD_INPUT


class NonFiniteLossError(SparkDetError, FloatingPointError):
    """Training diverged (a NaN, infinite or huge loss, or non-finite weights); the run stops and
    keeps its last good checkpoints. ``position`` is the (epoch, iteration) where it was seen."""

    exit_code = EXIT_DIVERGED

    def __init__(self, message: str, position: tuple[int, int] = (0, 0)) -> None:
        super().__init__(message)
        self.position = position


class OutputError(SparkDetError, OSError):
    """An output file or folder cannot be written."""

    exit_code = EXIT_CANNOT_WRITE


class RunLockedError(SparkDetError):
    """Another live process owns the run folder; two runs must not share checkpoints and logs."""

    exit_code = EXIT_LOCKED


class DistributedSetupError(SparkDetError):
    """The ranks of a torchrun/SLURM job could not form a process group in time."""

    exit_code = EXIT_NO_RENDEZVOUS


class PreemptedError(SparkDetError):
    """SIGTERM arrived: the run finished its step, wrote a checkpoint and stopped."""

    exit_code = EXIT_PREEMPTED


class MissingPackageError(SparkDetError, ImportError):
    """An optional package a command needs (an extra of ``setup.cfg``, or a detection framework)
    is not installed."""

    exit_code = EXIT_MISSING_PACKAGE


class LeakError(SparkDetError):
    """The leak audit found a visible feature that depends on masked patches (:mod:`spark_det.model.leak_probe`)."""

    exit_code = EXIT_LEAKS


class DataWarning(UserWarning):
    """A sample the run steps over (an unreadable image, a sample without one, a shard that ends
    early): worth one line to the user, never a stop."""


# Python's own formatting, for every warning that is not a DataWarning.
_PYTHON_FORMAT = warnings.formatwarning


def format_data_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                        line: Optional[str] = None) -> str:
    """``warnings.formatwarning`` that writes a :class:`DataWarning` as one ``[data] warning:`` line,
    like the rest of a run's log (Python's format adds the source line of whatever internal frame
    raised it); every other warning as Python writes it. Only the format changes: filters and
    ``catch_warnings(record=True)`` (pytest.warns) see the warning as before."""
    if issubclass(category, DataWarning):
        return f"[data] warning: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


@contextmanager
def data_warnings_as_lines() -> Iterator[None]:
    """Within this block (a command-line tool's run), :class:`DataWarning` shows as one line;
    the previous format is restored on exit (``catch_warnings`` does not restore this one)."""
    previous = warnings.formatwarning
    warnings.formatwarning = format_data_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous
