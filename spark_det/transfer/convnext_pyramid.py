"""ConvNeXt as a 4-level feature pyramid with the parameter names detection frameworks expect.

Detectron2 and MMDetection backbones (spark_det.d2.convnext, spark_det.mmdet.convnext) are this
module plus their framework's base class. The layout follows the original ConvNeXt / mmpretrain
code, ``downsample_layers.{0..3}`` (0 is the stem) and ``stages.{i}.{block}``, because
MMDetection's ``LearningRateDecayOptimizerConstructor`` assigns layer ids from exactly these
names. The blocks themselves are timm's, so a SparK-pretrained timm encoder maps onto it by
renaming keys only (:func:`timm_to_pyramid_keys`), and the features equal the encoder's.

No output norms are added (unlike mmpretrain's ``norm{i}``): they would be the only layers not
coming from the pretrained checkpoint, and the FPN's lateral convolutions follow anyway.
"""

from __future__ import annotations

import re

import timm
import torch
import torch.nn as nn

CONVNEXT_NAMES = ("convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
                  "convnext_small", "convnext_base", "convnext_large", "convnextv2_atto", "convnextv2_tiny")


class ConvNeXtPyramid(nn.Module):
    """timm ConvNeXt ``name`` re-arranged as downsample_layers / stages; forward -> 4 maps.

    Args:
        name: timm architecture (e.g. 'convnext_base').
        drop_path_rate: stochastic depth of the deepest block (the paper's detection recipe: 0.5
            for ConvNeXt-B at 3x; a 'drop_path_rate' ramp over blocks as in timm).

    Freezing follows each framework's own option through :meth:`freeze` (see the backbones).
    """

    def __init__(self, name: str, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not name.startswith("convnext"):
            raise ValueError(f"ConvNeXtPyramid needs a timm ConvNeXt name, got {name!r} (known: {CONVNEXT_NAMES})")
        model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", drop_path_rate=drop_path_rate)
        self.arch = name
        self.downsample_layers = nn.ModuleList([model.stem] + [model.stages[i].downsample for i in range(1, 4)])
        self.stages = nn.ModuleList(stage.blocks for stage in model.stages)
        self.channels: list[int] = [int(i["num_chs"]) for i in model.feature_info[-4:]]
        self.strides: list[int] = [int(i["reduction"]) for i in model.feature_info[-4:]]

    def freeze(self, stem: bool, stages: int) -> None:
        """Stop training the stem (``downsample_layers[0]``) and the first ``stages`` stages, each
        with the downsampling layer in front of it (stage 0 has none but the stem)."""
        frozen = ([self.downsample_layers[0]] if stem else []) + list(self.stages[:stages])
        frozen += list(self.downsample_layers[1:stages])
        for module in frozen:
            for p in module.parameters():
                p.requires_grad = False

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs at strides 4, 8, 16, 32 (what SparseEncoder returns for all-visible input)."""
        outs = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            outs.append(x)
        return outs


def timm_to_pyramid_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ConvNeXt keys -> ConvNeXtPyramid keys (stem.* -> downsample_layers.0.*, ...)."""
    out = {}
    for key, value in state.items():
        if key.startswith(("head.", "norm_pre.")):
            continue  # classifier / identity pre-norm: not part of the backbone
        name = re.sub(r"^stem\.", "downsample_layers.0.", key)
        name = re.sub(r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1.", name)
        name = re.sub(r"^stages\.(\d)\.blocks\.", r"stages.\1.", name)
        out[name] = value
    return out
