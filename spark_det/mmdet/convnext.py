"""ConvNeXt backbone for MMDetection 3.x, registered as ``SparKConvNeXt``.

Parameter names are ``downsample_layers.*`` / ``stages.{i}.{block}.*`` and the class name holds
"ConvNeXt", which is what MMDetection's own ``LearningRateDecayOptimizerConstructor`` needs for
the paper's layer-wise lr decay (``decay_type='layer_wise'``, ``num_layers=12``).
"""

from __future__ import annotations

from typing import Optional

import torch
from mmdet.registry import MODELS
from mmengine.model import BaseModule

from ..transfer.convnext_pyramid import ConvNeXtPyramid


@MODELS.register_module()
class SparKConvNeXt(ConvNeXtPyramid, BaseModule):
    """timm ConvNeXt (any size) as an MMDetection backbone returning 4 maps (strides 4-32).

    Args:
        arch: timm name, e.g. 'convnext_base'.
        drop_path_rate: stochastic depth (the paper: 0.5 for ConvNeXt-B 3x).
        out_indices: which of the 4 stage outputs to return.
        frozen_stages: as MMDetection's (mmpretrain's) ConvNeXt: stages 0..k-1 and their downsampling
            layers (the stem for stage 0) are frozen; 0 or -1 freezes nothing.
        init_cfg: e.g. dict(type='Pretrained', checkpoint='cnx_b_spark_mmdet.pth'), a file
            written by ``tools/convert_weights.py ... --to mmdet``.
    """

    def __init__(self, arch: str = "convnext_base", drop_path_rate: float = 0.0,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3), frozen_stages: int = -1,
                 init_cfg: Optional[dict] = None) -> None:
        ConvNeXtPyramid.__init__(self, arch, drop_path_rate=drop_path_rate)
        self.frozen_stages = frozen_stages
        self.freeze(stem=frozen_stages >= 1, stages=max(0, frozen_stages))
        self.init_cfg = init_cfg
        self.out_indices = tuple(out_indices)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.forward_pyramid(x)
        return tuple(outs[i] for i in self.out_indices)
