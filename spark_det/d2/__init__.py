"""Detectron2 adapter: config keys and the paper's optimizer. Imports detectron2; the core never does."""

from .config import add_spark_config
from .optim import build_layer_decay_optimizer, resnet_layer_id

__all__ = ["add_spark_config", "build_layer_decay_optimizer", "resnet_layer_id"]
