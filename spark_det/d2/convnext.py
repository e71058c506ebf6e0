"""ConvNeXt backbones for Detectron2: ``build_convnext_backbone`` and ``build_convnext_fpn_backbone``.

Registered in Detectron2's BACKBONE_REGISTRY when ``spark_det.d2`` is imported; select with
``MODEL.BACKBONE.NAME: build_convnext_fpn_backbone`` and ``MODEL.CONVNEXT.NAME: convnext_base``.
Written against the API shared by Detectron2 v0.6 and main (keyword ShapeSpec, Backbone,
FPN(bottom_up, in_features, out_channels, norm, top_block, fuse_type)).
"""

from __future__ import annotations

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ..errors import ConfigError
from ..transfer.convnext_pyramid import ConvNeXtPyramid

FEATURE_NAMES = ("res2", "res3", "res4", "res5")


class PyramidBackbone(Backbone):
    """A 4-level pyramid (``forward_pyramid``, ``channels``, ``strides``) as a Detectron2 Backbone
    returning ``out_features`` among res2..res5; shared by the ConvNeXt and the generic timm backbone."""

    def _select(self, out_features: tuple[str, ...], option: str) -> None:
        unknown = set(out_features) - set(FEATURE_NAMES)
        if unknown:
            raise ConfigError(f"{option}: unknown {sorted(unknown)}; choose from {FEATURE_NAMES}")
        self._out_features = list(out_features)
        self._out_feature_channels = dict(zip(FEATURE_NAMES, self.channels))
        self._out_feature_strides = dict(zip(FEATURE_NAMES, self.strides))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = dict(zip(FEATURE_NAMES, self.forward_pyramid(x)))
        return {name: features[name] for name in self._out_features}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}


class ConvNeXtBackbone(ConvNeXtPyramid, PyramidBackbone):
    """timm ConvNeXt (any size) returning ``out_features`` among res2..res5 (strides 4..32).

    ``freeze_at`` is Detectron2's ``MODEL.BACKBONE.FREEZE_AT``: 0 trains everything, 1 freezes the
    stem, 2 the stem and res2, 3 also res3 (with its downsampling layer), and so on.
    """

    def __init__(self, arch: str, out_features: tuple[str, ...] = FEATURE_NAMES, drop_path_rate: float = 0.0,
                 freeze_at: int = 0) -> None:
        super().__init__(arch, drop_path_rate=drop_path_rate)
        self.freeze(stem=freeze_at >= 1, stages=max(0, freeze_at - 1))
        self._select(out_features, "MODEL.CONVNEXT.OUT_FEATURES")


def fpn_on(bottom_up: Backbone, cfg) -> FPN:
    """Detectron2's FPN (MODEL.FPN.*, max-pooled P6) over a spark-det backbone."""
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_convnext_backbone(cfg, input_shape: ShapeSpec) -> ConvNeXtBackbone:
    c = cfg.MODEL.CONVNEXT
    return ConvNeXtBackbone(c.NAME, tuple(c.OUT_FEATURES), c.DROP_PATH_RATE, cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_convnext_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    return fpn_on(build_convnext_backbone(cfg, input_shape), cfg)
