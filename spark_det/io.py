"""Files: atomic writes and weights-only loads, shared by training, conversion and the tools."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch

from .errors import CheckpointError, OutputError

PathLike = Union[str, Path]


def write_atomic(path: PathLike, write: Callable[[Any], None]) -> Path:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, fsync, then rename over
    ``path``: readers see the old file or the complete new one, never a half-written one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_atomic(obj: Any, path: PathLike) -> Path:
    """``torch.save`` through :func:`write_atomic`."""
    return write_atomic(path, lambda f: torch.save(obj, f))


def save_pickle_atomic(obj: Any, path: PathLike) -> Path:
    """``pickle.dump`` through :func:`write_atomic` (Detectron2 reads .pkl files of numpy arrays)."""
    return write_atomic(path, lambda f: pickle.dump(obj, f))


def load_file(path: PathLike) -> dict:
    """``torch.load(weights_only=True)`` with an actionable error for missing or damaged files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        detail = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}{': ' + detail if detail else ''}); "
            "the file may be truncated (interrupted download or copy) or not a PyTorch checkpoint. "
            "Files that need pickled code are refused on purpose (weights_only=True)."
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj
