"""Pretraining optimisation: parameter groups, LAMB from timm, per-iteration lr / wd schedules."""

from __future__ import annotations

import math

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


def cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def lr_at(it: int, total_iters: int, warmup_iters: int, peak_lr: float,
          warmup_start_ratio: float = 0.005, final_ratio: float = 0.001) -> float:
    """Linear warm-up from ``warmup_start_ratio * peak`` then cosine to ``final_ratio * peak``."""
    if it < warmup_iters:
        return peak_lr * (warmup_start_ratio + (1 - warmup_start_ratio) * it / max(1, warmup_iters))
    progress = (it - warmup_iters) / max(1, total_iters - warmup_iters - 1)
    return cosine(peak_lr, peak_lr * final_ratio, progress)


def wd_at(it: int, total_iters: int, wd_start: float, wd_end: float) -> float:
    """Weight decay rising from ``wd_start`` to ``wd_end`` along a cosine (0.04 -> 0.2 in SparK)."""
    return cosine(wd_start, wd_end, it / max(1, total_iters - 1))


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)
