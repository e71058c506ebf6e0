"""Any SparK-supported timm CNN as a Detectron2 backbone: ``build_timm_fpn_backbone``.

Registered in Detectron2's BACKBONE_REGISTRY when ``spark_det.d2`` is imported; select with
``MODEL.BACKBONE.NAME: build_timm_fpn_backbone``, ``MODEL.TIMM.NAME: efficientnet_b3`` and
``MODEL.TIMM.WEIGHTS: encoder-efficientnet_b3.pth`` (a spark-det encoder export, loaded here with
every backbone tensor checked; leave ``MODEL.WEIGHTS`` empty, or point it at a whole-detector
checkpoint to resume, which then overrides these weights as Detectron2 always does).
"""

from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN

from ..errors import ConfigError
from ..transfer.timm_pyramid import TimmPyramid
from .convnext import FEATURE_NAMES, PyramidBackbone, fpn_on


class TimmBackbone(TimmPyramid, PyramidBackbone):
    """timm ``arch`` returning ``out_features`` among res2..res5 (strides 4..32), loaded from the
    spark-det export ``weights`` if given."""

    def __init__(self, arch: str, out_features: tuple[str, ...] = FEATURE_NAMES, drop_path_rate: float = 0.0,
                 weights: str = "") -> None:
        super().__init__(arch, drop_path_rate=drop_path_rate)
        self._select(out_features, "MODEL.TIMM.OUT_FEATURES")
        self.left_out = self.load_export(weights) if weights else []


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    if cfg.MODEL.BACKBONE.FREEZE_AT:
        raise ConfigError("MODEL.BACKBONE.FREEZE_AT must be 0 for the timm backbone (SparK fine-tunes every layer)")
    t = cfg.MODEL.TIMM
    return TimmBackbone(t.NAME, tuple(t.OUT_FEATURES), t.DROP_PATH_RATE, t.WEIGHTS)


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    return fpn_on(build_timm_backbone(cfg, input_shape), cfg)
