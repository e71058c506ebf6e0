"""A pretraining run's checkpoints: RNG states, the latest checkpoint, and starting from given weights."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..io import load_file
from ..transfer.layouts import require_same_tensors, timm_encoder_state

LAST_CHECKPOINT = "checkpoint-last.pth"


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
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: Union[str, Path]) -> Optional[Path]:
    path = Path(output_dir) / LAST_CHECKPOINT
    return path if path.is_file() else None


def load_init_weights(spark: nn.Module, path: Union[str, Path]) -> str:
    """Load encoder weights (and, from a full SparK checkpoint, the decoder too) into ``spark``.

    Accepts a spark-det full or encoder checkpoint and the paper's released files; refuses a
    file that does not fill every encoder tensor. Returns a one-line summary for the log.
    """
    obj = load_file(path)
    full = obj.get("model") if isinstance(obj.get("model"), dict) else obj.get("module")
    if isinstance(full, dict) and any(k.startswith("decoder.") for k in full):
        missing, unexpected = spark.load_state_dict(full, strict=False)
        if unexpected or any(k.startswith("encoder.") for k in missing):
            raise CheckpointError(f"{path}: full checkpoint does not match this model "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return f"full SparK model from {path}"
    state = timm_encoder_state(obj)  # unwrapped, timm names (paper's ConvNeXt renamed), no classifier
    target = spark.encoder.model.state_dict()
    require_same_tensors(state, target, f"{path} does not match encoder {spark.encoder.model_name}")
    spark.encoder.model.load_state_dict({k: state[k] for k in target}, strict=True)
    return f"encoder weights ({len(target)} tensors) from {path}"
