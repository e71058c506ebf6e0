"""Weights-only loading of mmengine checkpoints: mmengine 0.10.7 resumes with a plain ``torch.load``,
which torch >= 2.6 (``weights_only=True`` by default) refuses for its checkpoints.

mmengine checkpoints pickle numpy scalars/arrays and the message hub's HistoryBuffer, whose
statistics methods are stored as ``getattr(HistoryBuffer, 'min')``. torch's weights-only
unpickler accepts exactly the types listed here; ``builtins.getattr`` is replaced by a version
that can only fetch HistoryBuffer's registered statistics methods, so no other attribute (and
no code) is reachable from a checkpoint.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

BUILTIN_STATISTICS = ("min", "max", "current", "mean")  # filled into HistoryBuffer on first use


def _history_buffer_getattr(obj, name: str):
    allowed = (*BUILTIN_STATISTICS, *HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and name in allowed:
        return getattr(HistoryBuffer, name)
    raise ValueError(f"checkpoint asks for {obj!r}.{name}, which a weights-only mmengine checkpoint never needs")


def _allowed_globals() -> list:
    numpy_dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [
        np.dtype, np.ndarray, np.core.multiarray.scalar, np.core.multiarray._reconstruct, *numpy_dtypes,
        HistoryBuffer, (_history_buffer_getattr, "builtins.getattr"),
    ]


def load_local_checkpoint_weights_only(filename: str, map_location=None):
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    with torch.serialization.safe_globals(_allowed_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True)


def register_weights_only_loader() -> None:
    """Make mmengine load local checkpoints (resume, load_from, init_cfg) weights-only."""
    CheckpointLoader.register_scheme(prefixes="", force=True)(load_local_checkpoint_weights_only)
