"""Files: atomic writes and weights-only loads, shared by training, conversion and the tools."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from .errors import CheckpointError, InputFileError, OutputError, first_line

PathLike = Union[str, Path]

TEMPORARY_SUFFIX = ".tmp"  # write_atomic's temporaries: .<name>.<random>.tmp beside the target


def write_atomic(path: PathLike, write: Callable[[Any], None],
                 before_replace: Optional[Callable[[], None]] = None) -> Path:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, fsync, then rename over
    ``path``: readers see the old file or the complete new one, never a half-written one.
    ``before_replace()`` runs once the new file is complete, just before the rename (a checkpoint
    rotation keeps the old file under another name there); if it raises, ``path`` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(exc)
        if cause is None:
            raise
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise OutputError(f"cannot write {path}: {cause.strerror or cause}{_free_space(path.parent)}{kept}") from exc
    return path


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError behind ``exc``: torch.save reports a full disk as a RuntimeError ("unexpected
    pos ...") raised while handling the real ``OSError(ENOSPC)`` of the file's write."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _free_space(folder: Path) -> str:
    try:
        return f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free there)"
    except OSError:
        return ""


def remove_stale_temporaries(folder: PathLike) -> tuple[int, int]:
    """Delete the temporaries that killed :func:`write_atomic` calls left in ``folder`` (not its
    subfolders); only call it while no other process writes there. Returns (files, bytes)."""
    count = size = 0
    for tmp in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        if tmp.is_file():
            try:
                nbytes = tmp.stat().st_size
                tmp.unlink()
            except OSError:
                continue
            count, size = count + 1, size + nbytes
    return count, size


def save_atomic(obj: Any, path: PathLike, before_replace: Optional[Callable[[], None]] = None) -> Path:
    """``torch.save`` through :func:`write_atomic`."""
    return write_atomic(path, lambda f: torch.save(obj, f), before_replace)


def save_pickle_atomic(obj: Any, path: PathLike) -> Path:
    """``pickle.dump`` through :func:`write_atomic` (Detectron2 reads .pkl files of numpy arrays)."""
    return write_atomic(path, lambda f: pickle.dump(obj, f))


SAFETENSORS_SUFFIX = ".safetensors"


def save_safetensors_atomic(state: dict[str, torch.Tensor], path: PathLike,
                            metadata: Optional[dict[str, str]] = None) -> Path:
    """A flat state dict as safetensors (tensors and string metadata only, no code), through
    :func:`write_atomic`. Tensors are made contiguous and unshared, as the format requires."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    return write_atomic(path, lambda f: f.write(save(tensors, metadata=metadata)))


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    try:
        return load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        size = path.stat().st_size
        what = "the file is empty" if size == 0 else first_line(exc)
        raise CheckpointError(f"cannot read safetensors file {path} ({what}); the file may be truncated "
                              "(an interrupted download, copy or write)") from exc


def load_file(path: PathLike) -> dict:
    """``torch.load(weights_only=True)`` (or safetensors' loader for ``*.safetensors``) with an
    actionable error for missing or damaged files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # torch names the code a file asks for
        if "Weights only load failed" not in str(exc) or not found:
            raise CheckpointError(_damaged(path, exc)) from exc
        raise CheckpointError(
            f"checkpoint {path} holds pickled Python objects, not only tensors (it asks for {found.group(1)}); "
            "spark-det never runs code from a file. "
            "Save the weights as a plain state dict: torch.save(model.state_dict(), path)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(_damaged(path, exc)) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def _damaged(path: Path, exc: Exception) -> str:
    # Only torch's first line: later ones may advise weights_only=False, which runs a file's code.
    detail = first_line(exc)
    if "weights_only" in detail:
        detail = ""
    size = path.stat().st_size if path.exists() else 0
    what = "the file is empty" if size == 0 else f"{type(exc).__name__}{': ' + detail if detail else ''}"
    return (f"cannot read checkpoint {path} ({what}); the file may be truncated (an interrupted download, copy or "
            "write) or not a PyTorch checkpoint")


def coco_classes(annotations: PathLike, image_dir: Optional[PathLike] = None) -> tuple[str, ...]:
    """The class names of a COCO-format JSON in category-id order, checked before a framework reads
    it (minutes later, with a traceback): :class:`InputFileError` (exit 1) when the file is missing,
    does not parse or has no usable ``categories``, or ``image_dir`` does not exist."""
    path = Path(annotations)
    if not path.is_file():
        raise InputFileError(f"COCO annotation file {path} does not exist")
    if image_dir is not None and not Path(image_dir).is_dir():
        raise InputFileError(f"the image folder {image_dir} given with {path} does not exist")
    try:
        categories = json.loads(path.read_text())["categories"]
        return tuple(str(c["name"]) for c in sorted(categories, key=lambda c: c["id"]))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read COCO annotation file {path}: {first_line(exc)}") from exc
    except json.JSONDecodeError as exc:
        raise InputFileError(f"COCO annotation file {path} is not valid JSON ({exc})") from exc
    except (KeyError, TypeError) as exc:
        raise InputFileError(f"COCO annotation file {path} has no usable 'categories' (a list of {{'id', 'name'}}; "
                             f"{type(exc).__name__}: {exc}): is it a COCO instances file?") from exc


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB pieces (``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(16 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()
