"""AdamW with layer-wise lr decay for Detectron2 backbones (ResNet, ConvNeXt, any timm CNN), as in SparK.

Written here because Detectron2 v0.6 (the paper's version) has no lr_factor_func hook, and the
reference code's layer ids overflow for ResNet-152/200.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping

from ..transfer.timm_pyramid import NUM_LEVELS, TimmPyramid


def resnet_layer_id(name: str, res4_blocks: int) -> tuple[int, int]:
    """(layer id, number of ids N+2) for a parameter of a GeneralizedRCNN with a ResNet backbone.

    stem -> 0, res2 -> 1, res3 -> 2, res4 block b -> 3 + b // 3, res5 -> N, everything else
    (FPN, RPN, ROI heads) -> N + 1, where N = 3 + ceil(res4_blocks / 3).
    """
    n = 3 + (res4_blocks + 2) // 3
    if ".bottom_up." not in f".{name}":
        return n + 1, n + 2
    if ".stem." in name:
        return 0, n + 2
    m = re.search(r"\.res(\d)\.(\d+)\.", name)
    if m is None:
        return n + 1, n + 2
    stage, block = int(m.group(1)), int(m.group(2))
    return {2: 1, 3: 2, 4: 3 + block // 3, 5: n}[stage], n + 2


def convnext_layer_id(name: str, stage3_blocks: int) -> tuple[int, int]:
    """(layer id, number of ids N+2) for a parameter of a GeneralizedRCNN with a ConvNeXt backbone.

    MMDetection's ``get_layer_id_for_convnext`` rule, so both frameworks train alike: stem -> 0,
    stage 1 -> 1, stage 2 (and its downsampling) -> 2, stage 3 block b -> 3 + b // 3 (its
    downsampling -> 3), stage 4 -> N, the rest -> N + 1, with N = 3 + ceil(stage3_blocks / 3)
    (12 for ConvNeXt-S/B/L's 27 blocks, the paper's num_layers=12; 6 for ConvNeXt-T's 9).
    """
    n = 3 + (stage3_blocks + 2) // 3
    if ".bottom_up." not in f".{name}":
        return n + 1, n + 2
    m = re.search(r"\.(downsample_layers|stages)\.(\d)\.(\d+)\.", name)
    if m is None:
        return n + 1, n + 2
    kind, stage, index = m.group(1), int(m.group(2)), int(m.group(3))
    if kind == "downsample_layers":
        return {0: 0, 1: 2, 2: 3, 3: n}[stage], n + 2
    return {0: 1, 1: 2, 2: 3 + index // 3, 3: n}[stage], n + 2


def timm_layer_id_function(prefix: str, pyramid: TimmPyramid) -> Callable[[str], tuple[int, int]]:
    """The layer-id rule for a GeneralizedRCNN whose backbone is the generic timm one (``pyramid``,
    the module named ``prefix``): the stem -> 0, the parameters of pyramid level k (strides 4..32,
    the stages of timm's ``feature_info``) -> k, everything else (FPN, RPN, ROI heads) -> 5; 6 ids.
    For a ResNet with at most 3 res4 blocks this is :func:`resnet_layer_id` exactly."""
    depths = {f"{prefix}.{name}": depth for name, depth in pyramid.parameter_depths().items()}
    heads = NUM_LEVELS + 1
    return lambda name: (depths.get(name, heads), heads + 1)


def _layer_id_function(model: torch.nn.Module) -> Callable[[str], tuple[int, int]]:
    """The layer-id rule for ``model``'s backbone (the generic timm one, ConvNeXt if it has
    ``stages``, else ResNet)."""
    pyramids = [(name, m) for name, m in model.named_modules() if isinstance(m, TimmPyramid)]
    if pyramids:
        return timm_layer_id_function(*pyramids[0])
    names = [n for n, _ in model.named_parameters()]

    def blocks_in(pattern: str) -> int:
        return 1 + max((int(m.group(1)) for n in names for m in [re.search(pattern, n)] if m), default=0)

    if any(".bottom_up.stages." in f".{n}" for n in names):
        stage3 = blocks_in(r"\.bottom_up\.stages\.2\.(\d+)\.")
        return lambda name: convnext_layer_id(name, stage3)
    res4 = blocks_in(r"\.res4\.(\d+)\.")
    return lambda name: resnet_layer_id(name, res4)


def build_layer_decay_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) whose lr for layer id i is base_lr * decay ** (N + 1 - i); no weight decay
    on norms, biases and ConvNeXt's layer scales (1-D parameters)."""
    layer_id = _layer_id_function(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, count = layer_id(name)
        no_decay = param.ndim <= 1
        key = (layer, no_decay)
        if key not in groups:
            scale = cfg.SOLVER.LAYER_DECAY ** (count - 1 - layer)
            groups[key] = {"params": [], "lr": cfg.SOLVER.BASE_LR * scale, "layer_id": layer,
                           "weight_decay": 0.0 if no_decay else cfg.SOLVER.WEIGHT_DECAY}
        groups[key]["params"].append(param)
    params = [groups[k] for k in sorted(groups)]
    # SOLVER.CLIP_GRADIENTS through Detectron2's own wrapper, as its default optimizer does.
    if cfg.SOLVER.OPTIMIZER == "AdamW":
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=cfg.SOLVER.BASE_LR,
                                                                   betas=tuple(cfg.SOLVER.BETAS))
    if cfg.SOLVER.OPTIMIZER == "SGD":
        return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(params, lr=cfg.SOLVER.BASE_LR,
                                                                 momentum=cfg.SOLVER.MOMENTUM,
                                                                 nesterov=cfg.SOLVER.NESTEROV)
    raise ValueError(f"SOLVER.OPTIMIZER must be AdamW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
