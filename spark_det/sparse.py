"""Sparse execution of an unchanged dense CNN (SparK, Tian et al. ICLR 2023, Sec. 3.1).

The masked image is treated as a set of visible patches: every layer must behave as if masked
positions did not exist. As in SparK's reference code this is emulated with dense kernels:

* per-position layers (conv, pooling, LayerNorm, Linear in channels-last blocks) run densely and
  their outputs are zeroed at masked positions, so masked positions hold exactly 0 at every scale;
  a convolution therefore sees zeros where the sparse image has no entries;
* layers that pool statistics over positions (BatchNorm, GroupNorm, squeeze-excitation) use
  masked reductions, i.e. statistics of the visible positions only.

Layers are converted *per instance*: :func:`sparsify` copies each module into a sparse subclass
that shares its parameters and buffers, so parameter names (and thus timm checkpoints) are
unchanged and no timm or torch class is modified. The mask reaches the layers through the
:class:`~spark_det.masking.ActiveMask` of their own encoder, never through global state.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import BatchNormAct2d, DropPath, EffectiveSEModule, SEModule
from timm.layers import activations as timm_act
from timm.layers.grn import GlobalResponseNorm

from .masking import ActiveMask

# Elementwise or per-sample layers: they cannot move information between positions. Their output
# at masked positions is zeroed by the next sparse layer (and checked by `first_layer_fed_masked_values`).
POINTWISE_LAYERS: tuple[type, ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU,
    nn.PReLU, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.Dropout, DropPath,
    timm_act.Sigmoid, timm_act.HardSigmoid, timm_act.Swish, timm_act.Mish, timm_act.Tanh, timm_act.HardSwish, timm_act.HardMish, timm_act.GELU,
    timm_act.GELUTanh, timm_act.QuickGELU,
)


# ----------------------------------------------------------------------------------------------
# Functional cores (masked reductions)


def visible_mean(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean of ``x`` over ``dims`` counting only positions where ``mask`` (0/1, broadcastable) is 1."""
    count = mask.expand_as(x).sum(dims, keepdim=True).clamp_min(1)
    return (x * mask).sum(dims, keepdim=True) / count


def sparse_batch_norm(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    bn: nn.modules.batchnorm._BatchNorm,
    process_group: Optional[object] = None,
) -> torch.Tensor:
    """BatchNorm whose batch statistics come from visible positions only.

    Equals ``F.batch_norm`` applied to the gathered visible vectors [N_visible, C] and scattered
    back (the definition the tests check), without the gather/scatter. With ``process_group``
    (or the default group when ``bn.sparse_sync`` is set) the sums are all-reduced across ranks:
    a sparse SyncBatchNorm that also works with gloo on CPU. ``mask=None``: every position of
    ``x`` is visible (already gathered vectors, as [N, C, 1, 1]).
    """
    if mask is None:
        mask = x.new_ones(1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
    use_batch_stats = bn.training or not bn.track_running_stats
    if use_batch_stats:
        dims = (0, 2, 3)
        sync = process_group is not None
        count = mask.sum(dims).reshape(1)  # [1]
        total = (x * mask).sum(dims)  # [C]
        if sync:
            count, total = _all_reduce_sum(torch.cat([count, total]), process_group).split([1, total.numel()])
        mean = total / count.clamp_min(1)
        centered = (x - mean.view(1, -1, 1, 1)) * mask
        sq = centered.square().sum(dims)
        if sync:
            sq = _all_reduce_sum(sq, process_group)
        var = sq / count.clamp_min(1)
        if bn.training and bn.track_running_stats:
            _update_running_stats(bn, mean.detach(), var.detach(), count.detach())
    else:
        mean, var = bn.running_mean, bn.running_var
    inv_std = torch.rsqrt(var + bn.eps)
    scale = inv_std if bn.weight is None else bn.weight * inv_std
    shift = -mean * scale if bn.bias is None else bn.bias - mean * scale
    return (x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) * mask


def _all_reduce_sum(t: torch.Tensor, process_group: object) -> torch.Tensor:
    # torch.distributed.nn's all_reduce carries gradients back to every rank.
    from torch.distributed.nn.functional import all_reduce

    group = dist.group.WORLD if process_group is True else process_group
    return all_reduce(t, op=dist.ReduceOp.SUM, group=group)


@torch.no_grad()
def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean, var, count) -> None:
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    n = count.to(var.dtype)
    unbiased = var * n / (n - 1).clamp_min(1)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)


def sparse_group_norm(x: torch.Tensor, mask: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm whose per-sample, per-group statistics come from visible positions only."""
    b, c, h, w = x.shape
    g = gn.num_groups
    xg = x.view(b, g, c // g, h, w)
    mg = mask.view(b, 1, 1, h, w)
    mean = visible_mean(xg, mg, (2, 3, 4))
    var = visible_mean((xg - mean).square(), mg, (2, 3, 4))
    y = ((xg - mean) * torch.rsqrt(var + gn.eps)).view(b, c, h, w)
    if gn.affine:
        y = y * gn.weight.view(1, -1, 1, 1) + gn.bias.view(1, -1, 1, 1)
    return y * mask


# ----------------------------------------------------------------------------------------------
# Sparse layers. Each is created from a dense instance by `adopt`, which shares its state.


def retype(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s parameters, buffers, hooks and submodules
    (``cls`` must be a subclass of ``type(module)``'s base that adds only a forward)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


class SparseLayer:
    """Base of all sparse layers: knows the ActiveMask of its encoder and its tensor layout."""

    active: ActiveMask
    channels_last = False  # True for layers that run on [B, H, W, C] tensors

    @classmethod
    def adopt(cls, dense: nn.Module, active: ActiveMask) -> nn.Module:
        """A ``cls`` instance sharing ``dense``'s state (see :func:`retype`), reading ``active``."""
        sparse = retype(dense, cls)
        sparse.active = active
        return sparse


class RemaskOutput(SparseLayer):
    """Per-position layer: run the dense forward, then zero the output at masked positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * self.active.like(out, channels_last=self.channels_last)


class RemaskOutputChannelsLast(RemaskOutput):
    """Same for layers that run on [B, H, W, C] tensors (ConvNeXt's LayerNorm and MLP)."""

    channels_last = True


@functools.cache
def sparse_subclass(base: type, mixin: type) -> type:
    """``Sparse<Base>``: ``mixin``'s forward over ``base``'s (cached, one class per pair)."""
    return type(f"Sparse{base.__name__}", (mixin, base), {"__module__": __name__})


class SparseBatchNorm2d(SparseLayer, nn.BatchNorm2d):
    """BatchNorm2d over visible positions; ``sparse_sync`` all-reduces the statistics (DDP)."""

    sparse_sync: object = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_batch_norm(x, self.active.like(x), self, self.sparse_sync)


class SparseBatchNormAct2d(SparseLayer, BatchNormAct2d):
    """timm's BatchNorm + activation (RegNet, ...) with visible-position statistics."""

    sparse_sync: object = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.active.like(x)
        x = sparse_batch_norm(x, mask, self, self.sparse_sync)
        return self.act(self.drop(x)) * mask


class SparseGroupNorm(SparseLayer, nn.GroupNorm):
    """GroupNorm over visible positions (reference SparK issue 56)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_group_norm(x, self.active.like(x), self)


class SparseSEModule(SparseLayer, SEModule):
    """Squeeze-excitation whose squeeze averages visible positions only (reference issue 54)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = _visible_squeeze(x, self.active.like(x), self.add_maxpool)
        x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
        return x * self.gate(x_se)


class SparseEffectiveSEModule(SparseLayer, EffectiveSEModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc(_visible_squeeze(x, self.active.like(x), self.add_maxpool)))


class SparseGlobalResponseNorm(SparseLayer, GlobalResponseNorm):
    """ConvNeXt-V2's GRN: its spatial L2 norm already ignores the zeros at masked positions;
    only the bias must not fill them."""

    @property
    def channels_last(self) -> bool:
        return self.channel_dim == -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.active.like(x, channels_last=self.channels_last)


def _visible_squeeze(x: torch.Tensor, mask: torch.Tensor, add_maxpool: bool) -> torch.Tensor:
    x_se = visible_mean(x, mask, (2, 3))
    if add_maxpool:
        x_max = x.masked_fill(mask == 0, float("-inf")).amax((2, 3), keepdim=True)
        x_se = 0.5 * x_se + 0.5 * x_max
    return x_se
