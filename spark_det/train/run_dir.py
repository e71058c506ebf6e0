"""The run folder: owned by one run at a time, with checkpoints that survive kills, rot and divergence.

    checkpoint-last.pth                 the newest checkpoint (replaced only by a complete new one)
    checkpoint-epochEEEE-iterIIIIII.pth the ``keep_checkpoints - 1`` before it, by position
    metrics.jsonl                       one line per optimizer step, rewound on resume
    diverged.json                       where and with which config the run diverged
    .spark-det.lock                     while a run is live: who owns the folder

Only the main rank touches the folder; every method here is called there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import CheckpointError, ConfigError, OutputError, RunLockedError
from ..io import TEMPORARY_SUFFIX, PathLike, load_file, remove_stale_temporaries, save_atomic, write_atomic
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

    def positioned(self) -> list[tuple[Position, Path]]:
        """Every checkpoint whose position is known (``checkpoint-last.pth``'s read from the
        file if need be), newest first."""
        last = self.folder / LAST_CHECKPOINT
        where = (self.last_position or _position_of(last)) if last.is_file() else None
        return ([(where, last)] if where else []) + self.numbered()

    def confirmed(self, max_loss: Optional[float], iters_per_epoch: int) -> list[tuple[Position, Path]]:
        """The checkpoints confirmed good, newest first: the loss computed from the checkpoint's
        weights (the next iteration's, logged in ``metrics.jsonl`` at the checkpoint's position)
        was finite and not above ``max_loss``. Finite weights are not enough: weights of magnitude
        1e6 are finite, and the loss they give is not."""
        good = set()
        for record in self._metric_records():
            loss = record.get("loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss) and (max_loss is None or loss <= max_loss):
                good.add((record["epoch"], record["iter"]))
        found = []
        for (epoch, i), path in self.positioned():
            first_loss_at = (epoch + 1, 0) if i >= iters_per_epoch else (epoch, i)
            if first_loss_at in good:
                found.append(((epoch, i), path))
        return found

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
        """Write ``checkpoint-last.pth`` atomically and only then keep the previous one under its
        position's name, and drop checkpoints beyond ``keep_checkpoints``. A write that fails (a
        full disk) or is killed leaves ``checkpoint-last.pth`` exactly as it was."""
        last = self.folder / LAST_CHECKPOINT
        if position == self.last_position and last.is_file():
            return last  # this very state is already saved

        def keep_previous() -> None:  # the new file is complete: now rotate
            if self.keep > 1 and last.is_file():
                previous = self.last_position or _position_of(last)
                # A last checkpoint that cannot be read is set aside, not deleted: nothing is lost.
                _keep_as(last, self.folder / (numbered_checkpoint(previous) if previous
                                              else LAST_CHECKPOINT + ".unreadable"))

        save_atomic(state, last, before_replace=keep_previous)
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

    def _metric_records(self) -> list[dict[str, Any]]:
        """The lines of ``metrics.jsonl`` that parse and have a position (a kill may cut one short)."""
        path = self.folder / METRICS
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                record["epoch"], record["iter"] = int(record["epoch"]), int(record["iter"])
            except (ValueError, KeyError, TypeError):
                continue
            records.append(record)
        return records

    def rewind_metrics(self, position: Position) -> None:
        """Drop metric lines at or after ``position`` (and a line a kill cut short): after a resume
        each iteration is logged once."""
        path = self.folder / METRICS
        if not path.is_file():
            return
        kept = [json.dumps(r) + "\n" for r in self._metric_records() if (r["epoch"], r["iter"]) < tuple(position)]
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


def _keep_as(last: Path, target: Path) -> None:
    """Give ``last`` the name ``target`` too, leaving it in place until the new last checkpoint is
    renamed over it: a hard link (made under a temporary name, then renamed, so an older file of
    that name is replaced atomically). Where the file system has no hard links, ``last`` is
    renamed instead; a kill between that rename and the next leaves only the numbered copy."""
    link = target.with_name(f".{target.name}.{os.getpid()}.link{TEMPORARY_SUFFIX}")
    try:
        os.link(last, link)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        os.replace(last, target)
        return
    try:
        os.replace(link, target)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


def _rename(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise OutputError(f"cannot rename {source} to {target.name}: {exc.strerror or exc}") from exc
