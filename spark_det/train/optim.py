"""The pretraining optimizer: SparK's parameter groups, LAMB from timm (or AdamW)."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import Lamb

NO_DECAY_NAME_PARTS = ("mask_token", "gamma", "layer_scale")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and everything SparK exempts from decay (1-D params,
    biases, norm weights, mask tokens, layer-scale gammas)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith(".bias") or any(p in name for p in NO_DECAY_NAME_PARTS)
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0},
    ]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float]) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "lamb":
        # Clipping is done by the training loop (recipe: global norm 5), not inside LAMB.
        return Lamb(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, max_grad_norm=None)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use 'lamb' or 'adamw'")
