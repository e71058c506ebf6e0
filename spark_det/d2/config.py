"""Config keys spark-det adds to Detectron2's (call before merging a det_configs/ file)."""

from detectron2.config import CfgNode


def add_spark_config(cfg: CfgNode) -> None:
    cfg.SOLVER.OPTIMIZER = "SGD"  # "AdamW" for the paper's recipe
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.LAYER_DECAY = 1.0  # layer-wise lr decay; the paper uses 0.6 for ResNet-50
    cfg.MODEL.CONVNEXT = CfgNode()
    cfg.MODEL.CONVNEXT.NAME = "convnext_base"  # any timm ConvNeXt name
    cfg.MODEL.CONVNEXT.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.CONVNEXT.DROP_PATH_RATE = 0.0  # freezing: Detectron2's own MODEL.BACKBONE.FREEZE_AT
    cfg.MODEL.TIMM = CfgNode()  # the generic backbone (build_timm_fpn_backbone), any SparK-supported timm CNN
    cfg.MODEL.TIMM.NAME = "efficientnet_b3"
    cfg.MODEL.TIMM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.0
    cfg.MODEL.TIMM.WEIGHTS = ""  # a spark-det encoder export (encoder-<model>.pth), every tensor checked
