"""Config keys spark-det adds to Detectron2's (call before merging a det_configs/ file)."""

from detectron2.config import CfgNode


def add_spark_config(cfg: CfgNode) -> None:
    cfg.SOLVER.OPTIMIZER = "SGD"  # "AdamW" for the paper's recipe
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.LAYER_DECAY = 1.0  # layer-wise lr decay; the paper uses 0.6 for ResNet-50
