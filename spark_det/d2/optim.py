"""AdamW with layer-wise lr decay for Detectron2 ResNets, as in the SparK paper.

Written here because Detectron2 v0.6 (the paper's version) has no lr_factor_func hook, and the
reference code's layer ids overflow for ResNet-152/200.
"""

from __future__ import annotations

import re

import torch
from detectron2.config import CfgNode


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


def build_layer_decay_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) whose lr for layer id i is base_lr * decay ** (N + 1 - i); no weight decay
    on norms and biases."""
    res4_blocks = 1 + max(
        (int(m.group(1)) for n, _ in model.named_parameters() for m in [re.search(r"\.res4\.(\d+)\.", n)] if m),
        default=0,
    )
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, count = resnet_layer_id(name, res4_blocks)
        no_decay = param.ndim <= 1
        key = (layer, no_decay)
        if key not in groups:
            scale = cfg.SOLVER.LAYER_DECAY ** (count - 1 - layer)
            groups[key] = {"params": [], "lr": cfg.SOLVER.BASE_LR * scale, "layer_id": layer,
                           "weight_decay": 0.0 if no_decay else cfg.SOLVER.WEIGHT_DECAY}
        groups[key]["params"].append(param)
    params = [groups[k] for k in sorted(groups)]
    if cfg.SOLVER.OPTIMIZER == "AdamW":
        return torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS))
    if cfg.SOLVER.OPTIMIZER == "SGD":
        return torch.optim.SGD(params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM)
    raise ValueError(f"SOLVER.OPTIMIZER must be AdamW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
