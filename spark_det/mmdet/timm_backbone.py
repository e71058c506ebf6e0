"""Any SparK-supported timm CNN as an MMDetection 3.x backbone, registered as ``SparKTimm``.

    backbone=dict(type="SparKTimm", arch="efficientnet_b3", checkpoint="encoder-efficientnet_b3.pth")

``checkpoint`` is a spark-det encoder export (timm names), loaded by ``init_weights`` with every
backbone tensor checked (mmengine's ``Pretrained`` init would load it with ``strict=False`` and
only warn about layers left random).
"""

from __future__ import annotations

from typing import Optional

import torch
from mmdet.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModule

from ..transfer.timm_pyramid import TimmPyramid


@MODELS.register_module()
class SparKTimm(TimmPyramid, BaseModule):
    """timm ``arch`` returning the maps of ``out_indices`` among its 4 levels (strides 4-32).

    Args:
        arch: timm name, e.g. 'efficientnet_b3', 'regnety_040'.
        checkpoint: spark-det encoder export to start from (None: random initialisation).
        drop_path_rate: stochastic depth, passed to timm.
        out_indices: which of the 4 levels to return.
    """

    def __init__(self, arch: str, checkpoint: Optional[str] = None, drop_path_rate: float = 0.0,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3), init_cfg: Optional[dict] = None) -> None:
        TimmPyramid.__init__(self, arch, drop_path_rate=drop_path_rate)
        self.init_cfg = init_cfg
        self.checkpoint = checkpoint
        self.out_indices = tuple(out_indices)

    def init_weights(self) -> None:
        if self.checkpoint:
            left_out = self.load_export(self.checkpoint)
            print_log(f"SparKTimm {self.arch}: every backbone tensor from {self.checkpoint}"
                      + (f"; left out {len(left_out)} tensors after the last feature level" if left_out else ""),
                      logger="current")
        else:
            super().init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.forward_pyramid(x)
        return tuple(outs[i] for i in self.out_indices)
