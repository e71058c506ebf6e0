"""A pretraining run's checkpoints: RNG states, the latest checkpoint, and starting from given weights."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn as nn

from ..io import load_file
from ..transfer.layouts import (
    backbone_tensors,
    is_official_full_checkpoint,
    official_full_to_spark_det,
    require_same_tensors,
    timm_encoder_state,
    unwrap_state_dict,
)

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


def derive_rng_state(seed: int, position: tuple[int, int], rank: int) -> dict:
    """The RNG states a rank starts from at ``position`` when no saved state fits (the process
    count changed): a pure function of (seed, position, rank), like every other seed of a run."""
    keys = np.random.SeedSequence([seed, *position, rank, 0x5EED]).generate_state(4, np.uint64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(keys[0]) >> 1)
        cpu = torch.get_rng_state()
    numpy = np.random.RandomState(int(keys[1]) % 2**32).get_state()
    state = {
        "torch": cpu,
        "numpy": {"keys": torch.from_numpy(numpy[1].astype(np.int64)), "pos": int(numpy[2]), "has_gauss": 0,
                  "cached_gaussian": 0.0},
        "python": random.Random(int(keys[2])).getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [torch.Generator(device="cuda").manual_seed(int(keys[3]) >> 1).get_state()
                         for _ in range(torch.cuda.device_count())]
    return state


def load_init_weights(spark: nn.Module, path: Union[str, Path]) -> str:
    """Load encoder weights (and, from a full SparK checkpoint, the decoder too) into ``spark``.

    Accepts a spark-det full or encoder checkpoint and the paper's released files, encoder-only or
    with decoder (:mod:`spark_det.transfer.layouts`). Refuses a file that does not fill every tensor
    the model uses; only ``head.*`` of the encoder (timm ConvNeXt's final norm, which no feature
    reads and the paper's files lack) may keep its initial value. Returns a summary for the log.
    """
    obj = load_file(path)
    state = unwrap_state_dict(obj)
    ignored: list[str] = []
    if is_official_full_checkpoint(state):
        state, ignored = official_full_to_spark_det(state)
    if any(k.startswith("decoder.") for k in state):  # a full SparK model
        target = spark.state_dict()
        unused = {k for k in target if k.startswith("encoder.model.head.")}
        require_same_tensors({k: v for k, v in state.items() if k not in unused},
                             {k: v for k, v in target.items() if k not in unused},
                             f"{path} does not match this SparK model ({spark.encoder.model_name})")
        spark.load_state_dict(state, strict=False)
        note = f"; ignored {', '.join(ignored)} (never read by SparK)" if ignored else ""
        return f"full SparK model ({len(state)} tensors) from {path}{note}"
    state = timm_encoder_state(obj)  # unwrapped, timm names (paper's ConvNeXt renamed), no classifier
    target = spark.encoder.model.state_dict()
    require_same_tensors(backbone_tensors(state), backbone_tensors(target),
                         f"{path} does not match encoder {spark.encoder.model_name}")
    spark.encoder.model.load_state_dict(state, strict=False)
    return f"encoder weights ({len(state)} tensors) from {path}"
