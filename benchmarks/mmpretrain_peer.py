"""MMPretrain's SparK as a side-by-side peer for benchmarks/pretrain_step.py.

Built from MMPretrain's own configs (``mmpretrain::spark/...``), the models its recipes train, so the
comparison is with what MMPretrain users run, not with a re-implementation. Install it for
benchmarking only (``pip install -e .[bench]``, see docs/benchmarks.md); without it the
benchmark skips the peer with one line.

Differences that cannot be removed, said here once: MMPretrain draws its mask inside ``loss`` (same
ratio, 0.6, hence the same work; not the same positions) and its modules differ from spark-det's, so
weights cannot be shared; only speed and memory are compared, never losses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch

# spark-det model -> MMPretrain's pretraining config for it
CONFIGS = {
    "resnet50": "spark/spark_sparse-resnet50_8xb512-amp-coslr-800e_in1k.py",
    "convnext_small": "spark/spark_sparse-convnext-small_16xb256-amp-coslr-800e_in1k.py",
}


def unavailable_reason(name: str) -> Optional[str]:
    """Why the peer cannot run for ``name`` (None when it can)."""
    if name not in CONFIGS:
        return f"MMPretrain has no SparK config for {name} (it has {', '.join(CONFIGS)})"
    try:
        import mmpretrain  # noqa: F401
    except ImportError as exc:
        return f"mmpretrain is not importable ({exc}); pip install -e .[bench] to compare with it"
    return None


def build_peer(name: str, device: torch.device, input_size: int) -> tuple[torch.nn.Module, int]:
    """MMPretrain's SparK model for ``name`` as its config builds it; returns it and its decoder width."""
    import mmpretrain
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    init_default_scope("mmpretrain")
    cfg = Config.fromfile(str(Path(mmpretrain.__file__).parent / ".mim" / "configs" / CONFIGS[name]))
    cfg.model.input_size = input_size
    if device.type != "cuda":
        # Sync BN needs CUDA (or a process group) to synchronise; on one CPU process it is plain BN.
        cfg.model.enc_dec_norm_cfg = dict(type="SparseBatchNorm2d")
        if cfg.model.backbone.type == "SparseResNet":  # its default norm is SparseSyncBatchNorm2d
            cfg.model.backbone.norm_cfg = dict(type="SparseBatchNorm2d")
    model = MODELS.build(cfg.model).to(device)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # init_weights logs every parameter's initialiser at INFO
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model, int(cfg.model.neck.feature_dim)


def peer_step(model, optimizer, images: torch.Tensor, autocast: Callable[[], ContextManager]) -> None:
    """One MMPretrain training step as its runner does it: ``loss`` on preprocessed images, backward, step."""
    from mmpretrain.structures import DataSample

    with autocast():
        losses = model.loss(images, [DataSample() for _ in range(images.shape[0])])
    sum(v for k, v in losses.items() if "loss" in k).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
