"""MMDetection adapter (imported through ``custom_imports`` or tools/train_mmdet.py).

Registers the ``SparKConvNeXt`` backbone, and a weights-only loader for local checkpoints, so that
resuming mmengine runs works on torch >= 2.6 without unpickling arbitrary code (mmengine 0.10.7
calls plain torch.load). ``spark_det.mmdet.train`` is the ``spark-det train-mmdet`` command.
"""

from .checkpoint import load_local_checkpoint_weights_only, register_weights_only_loader
from .convnext import SparKConvNeXt

register_weights_only_loader()

__all__ = ["SparKConvNeXt", "load_local_checkpoint_weights_only", "register_weights_only_loader"]
