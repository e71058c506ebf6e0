"""Checkpoints: atomic writes, safe loads, and reading the weight layouts users bring."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

WRAPPER_KEYS = ("module", "state_dict", "model")
PREFIXES = ("module.encoder_q.", "module.encoder.", "module.", "encoder_q.", "encoder.model.", "encoder.", "model.")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, truncated or of an unexpected layout."""


def save_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_file(path: Union[str, Path]) -> dict:
    """``torch.load(weights_only=True)`` with an actionable error for missing or damaged files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "the file may be truncated (interrupted download or copy) or not a PyTorch checkpoint. "
            "Files that need pickled code are refused on purpose (weights_only=True)."
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The tensor dict inside common wrappers ('module' / 'state_dict' / 'model', possibly nested)."""
    for _ in range(3):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found in checkpoint (top-level keys: {sorted(obj)[:10]})")
    return tensors


def strip_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = PREFIXES) -> dict[str, torch.Tensor]:
    """Remove the first prefix that every key of a group shares (DDP's 'module.', MoCo's 'encoder_q.')."""
    for prefix in prefixes:
        if all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def encoder_state_from_checkpoint(obj: dict) -> dict[str, torch.Tensor]:
    """Encoder weights from a spark-det full checkpoint, an exported encoder or a released file."""
    state = unwrap_state_dict(obj)
    encoder_keys = {k: v for k, v in state.items() if k.startswith(("encoder.model.", "module.encoder.model."))}
    if encoder_keys:  # a full SparK state: keep the encoder only
        state = encoder_keys
    return strip_prefix(state)


def rng_state() -> dict:
    """All RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: Union[str, Path]) -> Optional[Path]:
    path = Path(output_dir) / "checkpoint-last.pth"
    return path if path.is_file() else None
