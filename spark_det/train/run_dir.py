"""The run folder: owned by one run at a time, with checkpoints that survive kills, rot and divergence.

    checkpoint-last.pth                 the newest checkpoint
    checkpoint-epochEEEE-iterIIIIII.pth the ``keep_checkpoints - 1`` before it, by position
    metrics.jsonl                       one line per optimizer step, rewound on resume
    diverged.json                       where and with which config the run diverged
    .spark-det.lock                     while a run is live: who owns the folder

Only the main rank touches the folder; every method here is called there.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import CheckpointError, ConfigError, OutputError, RunLockedError
from ..io import PathLike, load_file, remove_stale_temporaries, save_atomic, write_atomic
from .checkpoint import LAST_CHECKPOINT

LOCK_NAME = ".spark-det.lock"
DIVERGED = "diverged.json"
METRICS = "metrics.jsonl"
RUN_CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "iter", "rng")
_NUMBERED = re.compile(r"checkpoint-epoch(\d+)-iter(\d+)\.pth$")

Position = tuple[int, int]  # (epoch, iteration within the epoch) a checkpoint resumes at


def numbered_checkpoint(position: Position) -> str:
    return f"checkpoint-epoch{position[0]:04d}-iter{position[1]:06d}.pth"


class RunLock:
    """An exclusive ``flock`` on a file in the run folder.

    The kernel drops the lock when its process dies, however it dies (``kill -9`` included), so a
    killed run's lock is stale by construction and the next run simply takes it; the file's text
    (pid, host, start time) names the owner in the error message and in the takeover note.
    """

    def __init__(self, folder: PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: Optional[int] = None
        self._created_folder = False

    def acquire(self) -> Optional[str]:
        """Take the lock or raise :class:`RunLockedError`; returns the previous owner's text when
        a dead run's lock was taken over."""
        try:
            self._created_folder = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write the run folder {self.path.parent}: {exc.strerror or exc}") from exc
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 512, 0).decode(errors="replace").strip() or "an unknown process"
                os.close(fd)
                raise RunLockedError(
                    f"{self.path.parent} is in use by another spark-det run ({owner}); wait for it to end, stop it, "
                    "or choose another --output") from None
            try:  # the owner we waited for may have removed the file: then lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 512, 0).decode(errors="replace").strip()
        text = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        self._fd = fd
        return previous or None

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked, so no one locks a file about to vanish
        os.close(self._fd)
        self._fd = None
        if self._created_folder:  # a run that stopped before writing anything leaves no empty folder
            try:
                self.path.parent.rmdir()
            except OSError:
                pass


class RunDirectory:
    """Checkpoints, metrics and divergence records of one run folder (see the module docstring)."""

    def __init__(self, folder: PathLike, keep_checkpoints: int = 2, log: Callable[[str], None] = print) -> None:
        self.folder = Path(folder)
        self.keep = keep_checkpoints
        self.log = log
        self.last_position: Optional[Position] = None  # what checkpoint-last.pth holds, once known

    # -- checkpoints ---------------------------------------------------------------------------

    def numbered(self) -> list[tuple[Position, Path]]:
        """The kept older checkpoints, newest first."""
        found = []
        for path in self.folder.glob("checkpoint-epoch*-iter*.pth"):
            match = _NUMBERED.match(path.name)
            if match:
                found.append(((int(match.group(1)), int(match.group(2))), path))
        return sorted(found, reverse=True)

    def checkpoints(self) -> list[Path]:
        """Every checkpoint of the run, newest first."""
        last = self.folder / LAST_CHECKPOINT
        return ([last] if last.is_file() else []) + [path for _, path in self.numbered()]

    def describe(self) -> str:
        """The kept checkpoints and their positions, newest first, for messages."""
        items = []
        if (self.folder / LAST_CHECKPOINT).is_file():
            where = f" (epoch {self.last_position[0]} iteration {self.last_position[1]})" if self.last_position else ""
            items.append(LAST_CHECKPOINT + where)
        items += [f"{path.name}" for _, path in self.numbered()]
        return ", ".join(items) or "none"

    def load_latest(self) -> Optional[tuple[Path, dict[str, Any]]]:
        """The newest readable run checkpoint; an unreadable one is reported and the one before it
        tried. None if the folder has no checkpoint; :class:`CheckpointError` if none is readable."""
        candidates = self.checkpoints()
        problems = []
        for path in candidates:
            try:
                ckpt = load_run_checkpoint(path)
            except CheckpointError as exc:
                problems.append(f"{path.name}: {exc}")
                self.log(f"[pretrain] cannot resume from {path.name}: {exc}")
                continue
            if problems:
                self.log(f"[pretrain] falling back to the older checkpoint {path.name}")
            if path.name == LAST_CHECKPOINT:
                self.last_position = (ckpt["epoch"], ckpt["iter"])
            return path, ckpt
        if candidates:
            raise CheckpointError(f"no checkpoint in {self.folder} can be read ({'; '.join(problems)}); "
                                  "start a new run in another --output")
        return None

    def save(self, state: dict[str, Any], position: Position) -> Path:
        """Write ``checkpoint-last.pth`` atomically, first keeping the previous one under its
        position's name, and drop checkpoints beyond ``keep_checkpoints``."""
        last = self.folder / LAST_CHECKPOINT
        if position == self.last_position and last.is_file():
            return last  # this very state is already saved
        if self.keep > 1 and last.is_file():
            previous = self.last_position or _position_of(last)
            # A last checkpoint that cannot be read is set aside, not deleted: nothing is lost.
            target = numbered_checkpoint(previous) if previous else LAST_CHECKPOINT + ".unreadable"
            _rename(last, self.folder / target)
        save_atomic(state, last)
        self.last_position = position
        for _, path in self.numbered()[max(self.keep - 1, 0):]:
            path.unlink(missing_ok=True)
        return last

    def later_than(self, position: Position, keep: Path) -> list[Path]:
        """The checkpoints positioned after ``position`` (other than ``keep``)."""
        last = self.folder / LAST_CHECKPOINT
        found = [path for where, path in self.numbered() if where > tuple(position)]
        if last.is_file():
            where = self.last_position or _position_of(last)
            if where is None or where > tuple(position):
                found.append(last)
        return [path for path in found if path.resolve() != Path(keep).resolve()]

    def set_aside(self, paths: list[Path]) -> Path:
        """Move ``paths`` into ``abandoned-<time>/`` of the run folder; returns that folder."""
        target = self.folder / time.strftime("abandoned-%Y%m%d-%H%M%S")
        target.mkdir(exist_ok=True)
        for path in paths:
            _rename(path, target / path.name)
            if path.name == LAST_CHECKPOINT:
                self.last_position = None
        return target

    # -- the run's other files -----------------------------------------------------------------

    def clean_temporaries(self) -> None:
        count, size = remove_stale_temporaries(self.folder)
        if count:
            self.log(f"[pretrain] removed {count} temporary file(s) ({size / 2**20:.1f} MiB) left by an "
                     "interrupted write")

    def rewind_metrics(self, position: Position) -> None:
        """Drop metric lines at or after ``position`` (and a line a kill cut short): after a resume
        each iteration is logged once."""
        path = self.folder / METRICS
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                if (record["epoch"], record["iter"]) < tuple(position):
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        write_atomic(path, lambda f: f.write("".join(kept).encode()))

    def record_divergence(self, cfg: dict[str, Any], position: Position, message: str) -> None:
        text = json.dumps({"epoch": position[0], "iter": position[1], "message": message, "config": cfg}, indent=1)
        write_atomic(self.folder / DIVERGED, lambda f: f.write(text.encode()))

    def refuse_repeating_divergence(self, cfg: dict[str, Any], position: Position,
                                    same_trajectory: Callable[[dict, dict], bool]) -> None:
        """Training is deterministic: resuming before a recorded divergence with a config that
        gives the same trajectory would diverge again at the same iteration."""
        path = self.folder / DIVERGED
        if not path.is_file():
            return
        try:
            record = json.loads(path.read_text())
            failed_at = (record["epoch"], record["iter"])
            old_cfg = record["config"]
        except (ValueError, KeyError, TypeError):
            return
        if tuple(position) <= failed_at and same_trajectory(old_cfg, cfg):
            raise ConfigError(
                f"this run diverged at epoch {failed_at[0]} iteration {failed_at[1]} with this same config, and "
                "training is deterministic: resuming unchanged diverges again. Change lr, warmup_epochs, clip_grad "
                f"or amp (or delete {path} to retry anyway)")

    def clear_divergence(self) -> None:
        (self.folder / DIVERGED).unlink(missing_ok=True)


def load_run_checkpoint(path: PathLike) -> dict[str, Any]:
    """A checkpoint written by a pretraining run (weights-only), with every key a resume needs."""
    ckpt = load_file(path)
    missing = [k for k in RUN_CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a spark-det run checkpoint (no {missing}); "
                              "use --init-weights to start a new run from weights")
    return ckpt


def _position_of(path: Path) -> Optional[Position]:
    try:  # mmap: only the two integers are read, not the tensors
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["epoch"]), int(ckpt["iter"])
    except Exception:  # noqa: BLE001 - any unreadable file is set aside the same way
        return None


def _rename(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise OutputError(f"cannot rename {source} to {target.name}: {exc.strerror or exc}") from exc
