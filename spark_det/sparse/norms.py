"""Statistics over visible positions: the one core every sparse norm and pooling layer uses.

SparK's normalisation layers must see the sparse image as the set of its visible vectors, so
their statistics are means and variances over visible positions only. Everything here follows
from :func:`visible_moments`:

* sums are accumulated in at least float32 whatever the input dtype, and counts are exact
  integers (float64): under fp16 autocast a count above 65504 would otherwise become inf, bf16
  counts are inexact above 256 and float32 ones above 2**24 (a ResNet stem over 32 GPUs);
* with a process group the sums are all-reduced, and BatchNorm's backward all-reduces its own two
  sums (:class:`_TrainBatchNorm`), which is a sparse SyncBatchNorm that works with NCCL and gloo alike;
* running statistics are updated as ``nn.BatchNorm`` does (momentum, unbiased variance).

Every path uses it: per-layer sparse norms (:mod:`.layers`), the fast path's row blocks
(:mod:`.blocks`), the reference emulation (:mod:`.reference`), SparK's densify norms, and the dense
decoder's synchronised BatchNorm on CPU (:mod:`spark_det.train.sync_batchnorm`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ProcessGroup = object  # None (no sync), True (the default group) or a torch.distributed group


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the input's own dtype for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def _all_reduce_sum(t: torch.Tensor, process_group: ProcessGroup) -> torch.Tensor:
    """The sum over ranks of ``t`` (a new tensor; not differentiable: BatchNorm's backward is explicit)."""
    total = t.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=dist.group.WORLD if process_group is True else process_group)
    return total


def _visible_sum_and_count(x: torch.Tensor, mask: Optional[torch.Tensor], dims: tuple[int, ...],
                           process_group: Optional[ProcessGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the visible values in the accumulation dtype, exact visible count in float64),
    keepdim; ``mask=None``: every position is visible."""
    acc = accumulation_dtype(x.dtype)
    if mask is None:
        total = x.sum(dims, keepdim=True, dtype=acc)
        size = float(math.prod([x.shape[d] for d in dims]))  # lists, not generators: torch.compile traces them
        count = torch.full([1] * x.dim(), size, dtype=torch.float64, device=x.device)
    else:
        # Dimensions where the mask broadcasts (channels) multiply the count instead of expanding it.
        repeat = math.prod([x.shape[d] // mask.shape[d] for d in dims])
        count = mask.sum(dims, keepdim=True, dtype=torch.float64) * repeat
        total = (x.to(acc) * mask.to(acc)).sum(dims, keepdim=True)
    if process_group is not None:  # one all-reduce for both, in float64 so the count stays exact
        flat = _all_reduce_sum(torch.cat([count.flatten(), total.flatten().double()]), process_group)
        count, total = flat[: count.numel()].view_as(count), flat[count.numel():].view_as(total).to(acc)
    return total, count


def visible_mean(x: torch.Tensor, mask: Optional[torch.Tensor], dims: tuple[int, ...],
                 process_group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Mean of ``x`` over ``dims`` counting only positions where ``mask`` (0/1, broadcastable) is 1.

    Returned in ``x``'s dtype (it feeds the layer's next operation, e.g. SE's convolution).
    """
    total, count = _visible_sum_and_count(x, mask, dims, process_group)
    return (total / count.clamp_min(1).to(total.dtype)).to(x.dtype)


def visible_moments(x: torch.Tensor, mask: Optional[torch.Tensor], dims: tuple[int, ...],
                    process_group: Optional[ProcessGroup] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance) over the visible positions in the accumulation dtype, and the exact
    count (float64); all keepdim. ``mask=None``: every position is visible. Differentiable only
    without a process group (BatchNorm, the one synchronised user, needs no gradient through it)."""
    total, count = _visible_sum_and_count(x, mask, dims, process_group)
    divisor = count.clamp_min(1).to(total.dtype)
    mean = total / divisor
    centered = x.to(total.dtype) - mean
    if mask is not None:
        centered = centered * mask.to(total.dtype)
    square = centered.square().sum(dims, keepdim=True)
    if process_group is not None:
        square = _all_reduce_sum(square, process_group)
    return mean, square / divisor, count


@torch.no_grad()
def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                         count: torch.Tensor) -> None:
    """What nn.BatchNorm does with batch statistics: momentum update, unbiased variance."""
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * (count / (count - 1).clamp_min(1)).to(var.dtype)  # the factor in float64: exact
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)


def _state_dtype(norm: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a dense norm's output would have: a half-precision input's own (torch's BatchNorm
    and GroupNorm keep bf16/fp16 under autocast, which halves what the next layers save), else the
    input's promoted with the parameters'."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.dtype
    state = next((t for t in (getattr(norm, "weight", None), getattr(norm, "running_var", None)) if t is not None), x)
    return torch.promote_types(x.dtype, state.dtype)


def _normalise(x: torch.Tensor, mask: Optional[torch.Tensor], mean: torch.Tensor, inv_std: torch.Tensor,
               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(x - mean) * inv_std * weight + bias per channel of [B, C, H, W], zero where ``mask`` is 0."""
    scale = inv_std if weight is None else weight * inv_std
    shift = -mean * scale if bias is None else bias - mean * scale
    out = x.to(scale.dtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return out if mask is None else out * mask.to(out.dtype)


class _TrainBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm given its batch statistics, saving only its input for backward.

    Autograd through the statistics core would keep two float32 copies of every input (the cast
    and the centred values) for backward, over half of a ResNet encoder's activation memory under
    bf16; torch's own batch_norm cannot take our statistics (visible counts, all-reduced sums), so
    the standard BatchNorm backward is written here, once:
    dx = m * w / std * (g - sum(g) / N - xhat * sum(g * xhat) / N), with g = dy * m, sums over the
    visible positions of every rank (all-reduced like the forward's), dw = sum(g * xhat) and
    db = sum(g) over this rank's positions (DDP reduces parameter gradients itself).
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, mask, mean, inv_std, count, weight, bias, out_dtype, process_group):
        ctx.save_for_backward(x, mask, mean, inv_std, count, weight)
        ctx.bias_dtype, ctx.process_group = None if bias is None else bias.dtype, process_group
        return _normalise(x, mask, mean, inv_std, weight, bias).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, mean, inv_std, count, weight = ctx.saved_tensors
        shape, dims = (1, -1, 1, 1), (0, 2, 3)
        acc = mean.dtype
        xhat = (x.to(acc) - mean.view(shape)) * inv_std.view(shape)
        g = grad_out.to(acc)
        if mask is not None:
            g = g * mask.to(acc)
        local = torch.stack([g.sum(dims), (g * xhat).sum(dims)])  # [2, C]: sum(g), sum(g * xhat)
        total = local if ctx.process_group is None else _all_reduce_sum(local, ctx.process_group)
        total = total / count.clamp_min(1).to(acc).view(1, 1)
        scale = inv_std if weight is None else weight.to(acc) * inv_std
        grad_x = (g - total[0].view(shape) - xhat * total[1].view(shape)) * scale.view(shape)
        if mask is not None:
            grad_x = grad_x * mask.to(acc)
        grad_weight = local[1].to(weight.dtype) if ctx.needs_input_grad[5] else None
        grad_bias = local[0].to(ctx.bias_dtype) if ctx.needs_input_grad[6] else None
        return grad_x.to(x.dtype), None, None, None, None, grad_weight, grad_bias, None, None


def sparse_batch_norm(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    bn: nn.modules.batchnorm._BatchNorm,
    process_group: Optional[ProcessGroup] = None,
) -> torch.Tensor:
    """BatchNorm whose batch statistics come from visible positions only.

    Equals ``F.batch_norm`` applied to the gathered visible vectors [N_visible, C] and scattered
    back (the definition the tests check), without the gather/scatter. ``mask=None``: every
    position of ``x`` is visible (already gathered vectors, as [N, C, 1, 1]).
    """
    out_dtype = _state_dtype(bn, x)
    if bn.training or not bn.track_running_stats:
        with torch.no_grad():
            mean, var, count = visible_moments(x, mask, (0, 2, 3), process_group)
            mean, var = mean.view(-1), var.view(-1)
            if bn.training and bn.track_running_stats:
                update_running_stats(bn, mean, var, count.view(1))
            inv_std = torch.rsqrt(var + bn.eps)
        return _TrainBatchNorm.apply(x, mask, mean, inv_std, count.view(1), bn.weight, bn.bias, out_dtype,
                                     process_group)
    return _normalise(x, mask, bn.running_mean, torch.rsqrt(bn.running_var + bn.eps), bn.weight, bn.bias).to(out_dtype)


def batch_norm_rows(rows: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm,
                    process_group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """BatchNorm over gathered visible vectors [N, C] with ``bn``'s parameters and buffers (not its
    forward: synchronisation comes from ``process_group``, whatever class ``bn`` has)."""
    return sparse_batch_norm(rows[:, :, None, None], None, bn, process_group)[:, :, 0, 0]


def layer_norm_rows(rows: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm``'s LayerNorm over the channels of gathered vectors [N, C] (its own forward would
    permute a 4-D input, as timm's LayerNorm2d does)."""
    return F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def sparse_group_norm(x: torch.Tensor, mask: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm whose per-sample, per-group statistics come from visible positions only."""
    b, c, h, w = x.shape
    g = gn.num_groups
    xg = x.view(b, g, c // g, h, w)
    mg = mask.view(b, 1, 1, h, w)
    mean, var, _ = visible_moments(xg, mg, (2, 3, 4))
    y = ((xg.to(mean.dtype) - mean) * torch.rsqrt(var + gn.eps)).view(b, c, h, w)
    if gn.weight is not None:  # timm's GroupNorm1NoBias keeps the weight only
        y = y * gn.weight.view(1, -1, 1, 1)
    if gn.bias is not None:
        y = y + gn.bias.view(1, -1, 1, 1)
    return (y * mask.to(y.dtype)).to(_state_dtype(gn, x))


def visible_mean_rows(rows: torch.Tensor, sample: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample mean of gathered rows [N, C] -> [B, C] (the squeeze of SE over visible positions)."""
    acc = accumulation_dtype(rows.dtype)
    total = rows.new_zeros(batch, rows.shape[1], dtype=acc).index_add(0, sample, rows.to(acc))
    # not bincount: its output's length depends on the values (a graph break under torch.compile)
    count = total.new_zeros(batch).index_add_(0, sample, total.new_ones(sample.shape)).clamp_min(1)
    return (total / count[:, None]).to(rows.dtype)
