"""torchrun / DDP helpers. Nothing here patches builtins: logging is gated by ``is_main``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..sparse.convert import enable_sparse_sync_batchnorm
from ..sparse.layers import retype
from ..sparse.norms import sparse_batch_norm


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise from torchrun's environment (NCCL on GPUs, gloo on CPU); single process otherwise."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


class DenseSyncBatchNorm2d(nn.BatchNorm2d):
    """SyncBatchNorm that also runs on CPU/gloo (torch's needs a GPU): the sparse all-reduce
    BatchNorm with every position visible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = True if dist.is_initialized() and dist.get_world_size() > 1 else None
        return sparse_batch_norm(x, None, self, group)


def sync_batchnorms(model: nn.Module, use_torch_sync: bool) -> nn.Module:
    """Synchronise every BatchNorm across ranks: the encoder's sparse ones via all-reduce of
    visible statistics, the dense ones (decoder) via nn.SyncBatchNorm on GPU or our CPU version."""
    enable_sparse_sync_batchnorm(model)
    if use_torch_sync:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:  # exactly dense BN: the sparse ones are subclasses
                setattr(module, child_name, retype(child, DenseSyncBatchNorm2d))
    return model


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
