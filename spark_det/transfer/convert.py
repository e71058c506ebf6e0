"""Converters from a timm encoder state to each target: timm, torchvision, Detectron2 (.pkl), MMDetection.

Pure functions on state dicts; reading the source layout is :mod:`.layouts`' job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..io import SAFETENSORS_SUFFIX, PathLike, save_atomic, save_pickle_atomic
from .convnext_pyramid import timm_to_pyramid_keys
from .export import save_encoder_safetensors
from .layouts import check_covers, to_timm

TARGETS = ("detectron2", "mmdet", "timm", "torchvision")
SAFETENSORS_TARGETS = ("timm", "torchvision")  # plain state dicts; the others carry non-tensor fields


def resnet_to_detectron2(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """timm/torchvision ResNet -> Detectron2 ResNet names (stem, res2..res5, convK.norm, shortcut)."""
    out = {}
    for k, v in state.items():
        name = k
        if not name.startswith("layer"):
            name = "stem." + name
        for i in range(1, 5):
            name = name.replace(f"layer{i}.", f"res{i + 1}.")
        name = re.sub(r"bn(\d)", r"conv\1.norm", name)
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[name] = v.detach().cpu().numpy()
    return out


def _detection_backbone_state(state: dict[str, torch.Tensor], model_name: str, framework: str) -> dict:
    if model_name.startswith("convnext"):  # spark-det's ConvNeXt backbones (spark_det.transfer.convnext_pyramid)
        return timm_to_pyramid_keys(state)
    if model_name.startswith("resnet"):
        return resnet_to_detectron2(state) if framework == "detectron2" else dict(state)
    raise CheckpointError(f"{framework} conversion is for the framework's ResNet and spark-det's ConvNeXt backbones; "
                          f"{model_name} needs none: the generic timm backbone loads the spark-det export directly "
                          "(Detectron2 MODEL.TIMM.WEIGHTS, MMDetection SparKTimm checkpoint=)")


def detectron2_checkpoint(state: dict[str, torch.Tensor], model_name: str) -> dict:
    """The .pkl layout Detectron2's DetectionCheckpointer reads (names matched by its heuristics):
    Detectron2 ResNet names, or ``downsample_layers.*/stages.*`` for build_convnext_*_backbone."""
    model = _detection_backbone_state(state, model_name, "detectron2")
    model = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in model.items()}
    return {"model": model, "__author__": "spark-det", "matching_heuristics": True}


def mmdet_checkpoint(state: dict[str, torch.Tensor], model_name: str) -> dict:
    """MMDetection backbone weights: torchvision names for mmdet's ResNet (style='pytorch'),
    ``downsample_layers.*/stages.*`` for the SparKConvNeXt backbone."""
    model = _detection_backbone_state(state, model_name, "mmdet")
    return {"state_dict": model, "meta": {"converted_by": "spark-det", "arch": model_name}}


def convert(obj: dict, target: str, expect: Optional[str] = None) -> tuple[str, object, int]:
    """Convert a loaded checkpoint to ``target``; returns (architecture, converted object, #tensors)."""
    model_name, state = to_timm(obj)
    if expect and expect != model_name:
        raise CheckpointError(f"checkpoint holds {model_name}, but {expect} was asked for")
    check_covers(state, model_name)
    if target in ("timm", "torchvision"):
        if target == "torchvision" and not model_name.startswith("resnet"):
            raise CheckpointError(f"torchvision has no {model_name}")
        return model_name, state, len(state)
    if target == "detectron2":
        ckpt = detectron2_checkpoint(state, model_name)
        return model_name, ckpt, len(ckpt["model"])
    if target == "mmdet":
        ckpt = mmdet_checkpoint(state, model_name)
        return model_name, ckpt, len(ckpt["state_dict"])
    raise ValueError(f"unknown target {target!r}: use one of {TARGETS}")


def write_converted(converted: object, target: str, path: PathLike, arch: str = "") -> None:
    """Write :func:`convert`'s output atomically in the target's format (.pkl for Detectron2);
    timm and torchvision state dicts as safetensors when ``path`` ends in ``.safetensors``."""
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        if target not in SAFETENSORS_TARGETS:
            raise ConfigError(f"--to {target} cannot be written as {SAFETENSORS_SUFFIX}: "
                              f"{'Detectron2 reads .pkl' if target == 'detectron2' else 'MMDetection reads .pth'} "
                              f"files; safetensors is for {' and '.join(SAFETENSORS_TARGETS)}")
        save_encoder_safetensors(converted, arch, path)
        return
    (save_pickle_atomic if target == "detectron2" else save_atomic)(converted, path)
