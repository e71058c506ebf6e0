"""Detectron2 adapter: config keys, ConvNeXt and generic timm backbones (registered on import) and the paper's
optimizer. Imports detectron2; the core never does."""

from .config import add_spark_config
from .convnext import ConvNeXtBackbone, build_convnext_backbone, build_convnext_fpn_backbone
from .optim import build_layer_decay_optimizer, convnext_layer_id, resnet_layer_id
from .timm_backbone import TimmBackbone, build_timm_backbone, build_timm_fpn_backbone

__all__ = ["ConvNeXtBackbone", "TimmBackbone", "add_spark_config", "build_convnext_backbone",
           "build_convnext_fpn_backbone", "build_layer_decay_optimizer", "build_timm_backbone",
           "build_timm_fpn_backbone", "convnext_layer_id", "resnet_layer_id"]
