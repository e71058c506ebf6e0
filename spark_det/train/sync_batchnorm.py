"""Preparing SparK for DDP: BatchNorms synchronised across ranks without losing a sparse layer, and
an unsynchronised copy one rank can run alone (the leak audit)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..sparse.convert import enable_sparse_sync_batchnorm
from ..sparse.layers import SparseLayer, retype
from ..sparse.norms import sparse_batch_norm


class DenseSyncBatchNorm2d(nn.BatchNorm2d):
    """SyncBatchNorm that also runs on CPU/gloo (torch's needs a GPU): the shared visible-position
    core with every position visible, all-reduced across ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = True if dist.is_initialized() and dist.get_world_size() > 1 else None
        return sparse_batch_norm(x, None, self, group)


def unsynchronised_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` whose BatchNorms compute their statistics locally: one rank can run
    it alone (the leak audit) without waiting in a collective for the others."""
    copy_ = copy.deepcopy(model).cpu()
    enable_sparse_sync_batchnorm(copy_, None)
    for parent in copy_.modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.SyncBatchNorm, DenseSyncBatchNorm2d)) and not isinstance(child, SparseLayer):
                setattr(parent, name, retype(child, nn.BatchNorm2d))
    return copy_


class StillSparseError(RuntimeError):
    """A module that ran sparsely was replaced: the model would no longer be SparK."""


def sparse_layer_types(model: nn.Module) -> dict[str, type]:
    """Name -> class of every sparse layer (what DDP preparation must leave in place)."""
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, SparseLayer)}


def assert_still_sparse(model: nn.Module, before: dict[str, type]) -> None:
    """Raise :class:`StillSparseError` naming every sparse layer of ``before`` that is gone or changed."""
    now = dict(model.named_modules())
    lost = [f"{name} ({cls.__name__} -> {type(now[name]).__name__ if name in now else 'missing'})"
            for name, cls in before.items() if type(now.get(name)) is not cls]
    if lost:
        raise StillSparseError(f"{len(lost)} sparse layer(s) were replaced, e.g. {lost[:3]}: their statistics "
                               "would include masked positions")


def _replace_dense_batchnorms(module: nn.Module, make: Callable[[nn.BatchNorm2d], nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, SparseLayer):
            continue  # sparse layers (and the dense parameter holders inside row blocks) stay as they are
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, make(child))
        else:
            _replace_dense_batchnorms(child, make)


def sync_batchnorms(model: nn.Module, use_torch_sync: bool) -> nn.Module:
    """Synchronise every BatchNorm across ranks, in place: the sparse ones all-reduce their
    visible-position statistics (the shared core, NCCL or gloo); the dense ones (the decoder's)
    become ``nn.SyncBatchNorm`` on GPUs (``use_torch_sync``) or :class:`DenseSyncBatchNorm2d`.

    Never replaces a sparse layer (unlike ``nn.SyncBatchNorm.convert_sync_batchnorm`` on the whole
    model, which turns every BatchNorm subclass into a dense one), and checks that afterwards.
    """
    before = sparse_layer_types(model)
    enable_sparse_sync_batchnorm(model)
    make = nn.SyncBatchNorm.convert_sync_batchnorm if use_torch_sync else (
        lambda bn: retype(bn, DenseSyncBatchNorm2d))
    _replace_dense_batchnorms(model, make)
    assert_still_sparse(model, before)
    return model
