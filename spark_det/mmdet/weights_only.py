"""Opt-in: importing this module makes mmengine load local checkpoints weights-only.

    custom_imports = dict(imports=["spark_det.mmdet", "spark_det.mmdet.weights_only"])

See :func:`spark_det.mmdet.checkpoint.register_weights_only_loader`.
"""

from .checkpoint import register_weights_only_loader

register_weights_only_loader()
