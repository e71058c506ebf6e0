"""One pretraining epoch: per-iteration schedules, autocast, clipping, accumulation, metrics."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.sampler import sample_seed
from ..errors import NonFiniteLossError
from ..sparse.masking import num_visible, random_visible_mask
from .schedule import Schedule, apply_schedule


def sample_masks(keys: list[tuple[int, int]], grid: tuple[int, int], mask_ratio: float, seed: int,
                 device: torch.device) -> torch.Tensor:
    """One mask per sample, seeded by the sample's (epoch, index): independent of how the global
    batch is split over ranks, so 1 process and N processes see the same masks."""
    masks = [
        random_visible_mask(1, grid, mask_ratio, torch.Generator().manual_seed(sample_seed(seed + 1, e, i)))
        for e, i in keys
    ]
    return torch.cat(masks).to(device)


def train_one_epoch(
    model: nn.Module,
    spark: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    epoch: int,
    iters_per_epoch: int,
    start_iter: int,
    device: torch.device,
    seed: int,
    accum_steps: int = 1,
    clip_grad: Optional[float] = 5.0,
    amp_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    channels_last: bool = False,
    on_iteration: Optional[Callable[[int, dict], None]] = None,
    max_loss: Optional[float] = None,
    stop_requested: Optional[Callable[[], bool]] = None,
) -> None:
    """Train ``model`` (SparK, possibly DDP-wrapped as ``model``; ``spark`` is the bare module)
    from iteration ``start_iter`` of ``epoch`` to the end of the epoch.

    ``on_iteration(global_iter, metrics)`` is called after every optimizer step (logging,
    checkpoints); an exception it raises ends the run (the Pretrainer stops at ``stop_after_iters`` so).
    ``metrics["skipped_files"]`` lists the indices of the unreadable files the batch skipped.
    A loss that is not finite, or above ``max_loss``, raises :class:`NonFiniteLossError` before
    the step is taken, on every rank at once. ``metrics["stop_requested"]`` is True on every rank
    when ``stop_requested()`` (e.g. a SIGTERM flag) is True on any rank.
    """
    model.train()
    grid = None
    tick = time.perf_counter()
    for i, batch in enumerate(loader, start=start_iter):
        it = epoch * iters_per_epoch + i
        lr, wd = schedule.lr(it), schedule.weight_decay(it)
        apply_schedule(optimizer, lr, wd)

        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        grid = grid or spark.encoder.grid_size(images.shape[-2:])
        visible = sample_masks(batch["key"], grid, spark.mask_ratio, seed, device)
        # every mask keeps the same number of patches: gathers and scatters get static shapes
        per_image = num_visible(grid, spark.mask_ratio)

        micro_losses = []
        for micro, (x, v) in enumerate(zip(images.chunk(accum_steps), visible.chunk(accum_steps))):
            # DDP all-reduces gradients in the backward pass of the last micro-batch only; each
            # earlier one gets a fresh no_sync context around its forward and backward.
            skip_sync = micro < accum_steps - 1 and hasattr(model, "no_sync")
            with model.no_sync() if skip_sync else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = model(x, v, per_image=per_image) / accum_steps
                (scaler.scale(loss) if scaler else loss).backward()
            micro_losses.append(loss.detach().float())

        # One host synchronisation per step: the global batch's loss, for the finiteness check
        # (the same on every rank, so all ranks stop together) and the log, with any rank's stop flag.
        stop_flag = 1.0 if stop_requested is not None and stop_requested() else 0.0
        packed = torch.cat([torch.stack(micro_losses).sum().reshape(1).double(),
                            torch.tensor([stop_flag], dtype=torch.float64, device=device)])
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(packed)
        loss_value, stop_votes = packed.tolist()
        loss_value /= world
        if not math.isfinite(loss_value) or (max_loss is not None and loss_value > max_loss):
            above = f" (above max_loss {max_loss:g})" if math.isfinite(loss_value) else ""
            raise NonFiniteLossError(f"loss is {loss_value:.4g}{above} at epoch {epoch} iteration {i} (lr {lr:.3g})",
                                     position=(epoch, i))

        if scaler:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float("inf"))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        now = time.perf_counter()
        metrics = {
            "epoch": epoch, "iter": i, "global_iter": it, "loss": loss_value, "lr": lr, "wd": wd,
            "grad_norm": float(grad_norm), "images_per_s": images.shape[0] / max(now - tick, 1e-9),
            "skipped_files": sorted(set(batch["skipped"])), "stop_requested": stop_votes > 0,
        }
        if device.type == "cuda":
            metrics["max_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        tick = now
        if on_iteration is not None:
            on_iteration(it, metrics)
