"""Pure state-dict converters between the weight layouts SparK users meet.

Sources: spark-det full/encoder checkpoints, the paper's released files (timm-style ResNet,
original-ConvNeXt-style ConvNeXt, wrapped in 'module'/'state_dict'/'model', MoCo prefixes),
plain timm/torchvision state dicts. Targets: timm, torchvision, Detectron2 (.pkl), MMDetection.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch

from .checkpoint import CheckpointError, encoder_state_from_checkpoint
from .convnext_pyramid import timm_to_pyramid_keys

RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152, ("bottleneck", (3, 24, 36, 3)): 200,
}
CONVNEXT_SIZES = {
    ((2, 2, 6, 2), 40): "atto", ((2, 2, 6, 2), 48): "femto", ((2, 2, 6, 2), 64): "pico", ((2, 2, 8, 2), 80): "nano",
    ((3, 3, 9, 3), 96): "tiny", ((3, 3, 27, 3), 96): "small", ((3, 3, 27, 3), 128): "base",
    ((3, 3, 27, 3), 192): "large",
}
HEAD_PREFIXES = ("fc.", "head.fc.", "head.weight", "head.bias")


def _count_blocks(keys, pattern: str) -> tuple[int, ...]:
    found: dict[int, set[int]] = {}
    for k in keys:
        m = re.match(pattern, k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(found[i]) for i in sorted(found))


def original_convnext_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's ConvNeXt files (facebookresearch naming) -> timm's convnext_* names."""
    out = {}
    for k, v in state.items():
        m = re.match(r"downsample_layers\.(\d)\.(\d)\.(.*)", k)
        if m:
            stage, idx, rest = int(m.group(1)), m.group(2), m.group(3)
            out[f"stem.{idx}.{rest}" if stage == 0 else f"stages.{stage}.downsample.{idx}.{rest}"] = v
            continue
        m = re.match(r"stages\.(\d)\.(\d+)\.(.*)", k)
        if m:
            rest = m.group(3)
            for old, new in (("dwconv", "conv_dw"), ("pwconv1", "mlp.fc1"), ("pwconv2", "mlp.fc2")):
                rest = rest.replace(old, new)
            out[f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"] = v
            continue
        if k.startswith("norm."):
            out["head.norm." + k[len("norm."):]] = v
        elif not k.startswith("head."):
            out[k] = v
    return out


def identify(state: dict[str, torch.Tensor]) -> str:
    """timm model name of a (timm-named) encoder state dict, e.g. 'resnet50', 'convnext_base'."""
    keys = list(state)
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in keys) else "basic"
        blocks = _count_blocks(keys, r"layer(\d)\.(\d+)\.conv1\.weight")
        depth = RESNET_DEPTHS.get((kind, blocks))
        if depth is None:
            raise CheckpointError(f"ResNet-like checkpoint with {kind} blocks {blocks} matches no known depth "
                                  "(a truncated or partial state dict?)")
        return f"resnet{depth}"
    if "stem.0.weight" in state and any(".blocks." in k for k in keys):
        depths = _count_blocks(keys, r"stages\.(\d)\.blocks\.(\d+)\.conv_dw\.weight")
        size = CONVNEXT_SIZES.get((depths, int(state["stem.0.weight"].shape[0])))
        if size is None:
            raise CheckpointError(f"ConvNeXt-like checkpoint with depths {depths} matches no known size "
                                  "(a truncated or partial state dict?)")
        return f"convnext_{size}"
    raise CheckpointError(
        f"cannot infer the architecture: keys look like neither a ResNet nor a ConvNeXt (first keys: {keys[:5]})"
    )


def timm_encoder_state(obj: dict) -> dict[str, torch.Tensor]:
    """Any supported source -> encoder state dict with timm names and no classifier."""
    state = encoder_state_from_checkpoint(obj)
    if any(k.startswith("downsample_layers.") for k in state):
        state = original_convnext_to_timm(state)
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}


def to_timm(obj: dict) -> tuple[str, dict[str, torch.Tensor]]:
    """Any supported source -> (timm model name, :func:`timm_encoder_state`)."""
    state = timm_encoder_state(obj)
    return identify(state), state


def key_mismatch(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
                 ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape-mismatched) keys of ``state`` against ``reference``, sorted."""
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    bad = sorted(k for k in set(reference) & set(state) if tuple(reference[k].shape) != tuple(state[k].shape))
    return missing, unexpected, bad


def check_covers(state: dict[str, torch.Tensor], model_name: str) -> None:
    """Refuse a state dict that does not fill every tensor of ``timm.create_model(model_name)``."""
    import timm

    with torch.device("meta"):
        reference = timm.create_model(model_name, num_classes=0).state_dict()
    missing, unexpected, bad = key_mismatch(state, reference)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not cover {model_name}: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); the file may be truncated or another model"
        )
    if bad:
        raise CheckpointError(f"shape mismatch for {model_name} at {bad[:3]}: "
                              f"{tuple(state[bad[0]].shape)} vs {tuple(reference[bad[0]].shape)}")


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
    if model_name.startswith("convnext"):  # spark-det's ConvNeXt backbones (spark_det.convnext_pyramid)
        return timm_to_pyramid_keys(state)
    if model_name.startswith("resnet"):
        return resnet_to_detectron2(state) if framework == "detectron2" else dict(state)
    raise CheckpointError(f"{framework} conversion supports ResNets and ConvNeXts, not {model_name}")


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
    raise ValueError(f"unknown target {target!r}: use detectron2, mmdet, timm or torchvision")
