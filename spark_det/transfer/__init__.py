"""Weight transfer: read the layouts users bring (:mod:`.layouts`), convert them for timm,
torchvision, Detectron2 and MMDetection (:mod:`.convert`), and the ConvNeXt feature pyramid both
frameworks' backbones are built from (:mod:`.convnext_pyramid`)."""

from .convert import TARGETS, convert, detectron2_checkpoint, mmdet_checkpoint, write_converted
from .layouts import check_covers, identify, timm_encoder_state, to_timm

__all__ = ["TARGETS", "check_covers", "convert", "detectron2_checkpoint", "identify", "mmdet_checkpoint",
           "timm_encoder_state", "to_timm", "write_converted"]
