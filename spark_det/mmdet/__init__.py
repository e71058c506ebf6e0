"""MMDetection adapter (imported through ``custom_imports`` or ``spark-det train-mmdet``).

Importing it registers the ``SparKConvNeXt`` and ``SparKTimm`` backbones, nothing else. The weights-only loader for
local checkpoints (resuming mmengine runs on torch >= 2.6 without unpickling arbitrary code;
mmengine 0.10.7 calls plain torch.load) changes how mmengine loads every local checkpoint of the
process, so it is opt-in: ``spark-det train-mmdet`` turns it on, and configs run with MMDetection's
own tools list ``"spark_det.mmdet.weights_only"`` in ``custom_imports`` (the ones in det_configs do).
"""

from .checkpoint import load_local_checkpoint_weights_only, register_weights_only_loader
from .convnext import SparKConvNeXt
from .timm_backbone import SparKTimm

__all__ = ["SparKConvNeXt", "SparKTimm", "load_local_checkpoint_weights_only", "register_weights_only_loader"]
