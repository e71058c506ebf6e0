"""Per-iteration schedules: linear warm-up then cosine lr, cosine-rising weight decay (SparK's recipe)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    """The schedule of one run, in iterations (optimizer steps)."""

    total_iters: int
    warmup_iters: int
    peak_lr: float
    wd_start: float
    wd_end: float

    def lr(self, it: int) -> float:
        return lr_at(it, self.total_iters, self.warmup_iters, self.peak_lr)

    def weight_decay(self, it: int) -> float:
        return wd_at(it, self.total_iters, self.wd_start, self.wd_end)


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
    """Set every group's lr, and its weight decay scaled by the group's ``wd_scale`` (0: exempt)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)
