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
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import BatchNormAct2d, DropPath, EffectiveSEModule, LayerNorm2d, SEModule
from timm.layers import activations as timm_act
from timm.layers.grn import GlobalResponseNorm
from timm.layers.norm import LayerNorm2dFp32

from .masking import ActiveMask


class UnsupportedLayerError(TypeError):
    """A layer on the encoder's forward path has no sparse implementation."""


# ----------------------------------------------------------------------------------------------
# Functional cores (masked reductions)


def visible_mean(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean of ``x`` over ``dims`` counting only positions where ``mask`` (0/1, broadcastable) is 1."""
    count = mask.expand_as(x).sum(dims, keepdim=True).clamp_min(1)
    return (x * mask).sum(dims, keepdim=True) / count


def sparse_batch_norm(
    x: torch.Tensor,
    mask: torch.Tensor,
    bn: nn.modules.batchnorm._BatchNorm,
    process_group: Optional[object] = None,
) -> torch.Tensor:
    """BatchNorm whose batch statistics come from visible positions only.

    Equals ``F.batch_norm`` applied to the gathered visible vectors [N_visible, C] and scattered
    back (the definition the tests check), without the gather/scatter. With ``process_group``
    (or the default group when ``bn.sparse_sync`` is set) the sums are all-reduced across ranks:
    a sparse SyncBatchNorm that also works with gloo on CPU.
    """
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
def _sparse_subclass(base: type, mixin: type) -> type:
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


# ----------------------------------------------------------------------------------------------
# Conversion


# Elementwise or per-sample layers: they cannot move information between positions. Their output
# at masked positions is zeroed by the next sparse layer (and checked by `verify_masked_zero`).
POINTWISE_LAYERS: tuple[type, ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU,
    nn.PReLU, nn.Tanh, nn.Dropout, DropPath,
    timm_act.Swish, timm_act.Mish, timm_act.Tanh, timm_act.HardSwish, timm_act.HardMish, timm_act.GELU,
    timm_act.GELUTanh, timm_act.QuickGELU,
)


def _converter_for(module: nn.Module) -> Optional[Callable[[nn.Module, ActiveMask], nn.Module]]:
    """The sparse replacement for ``module``, or None when it needs none (pointwise/container)."""
    if isinstance(module, SparseLayer):
        return None
    if isinstance(module, BatchNormAct2d):
        return SparseBatchNormAct2d.adopt
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return SparseBatchNorm2d.adopt
    if isinstance(module, nn.GroupNorm):
        return SparseGroupNorm.adopt
    if isinstance(module, SEModule):
        return SparseSEModule.adopt
    if isinstance(module, EffectiveSEModule):
        return SparseEffectiveSEModule.adopt
    if isinstance(module, GlobalResponseNorm):
        return SparseGlobalResponseNorm.adopt
    if isinstance(module, (LayerNorm2d, LayerNorm2dFp32, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return _sparse_subclass(type(module), RemaskOutput).adopt
    if isinstance(module, (nn.LayerNorm, nn.Linear)):  # on 4-D input both act on the last (channel) dim
        return _sparse_subclass(type(module), RemaskOutputChannelsLast).adopt
    return None


def sparsify(
    model: nn.Module,
    active: ActiveMask,
    only: Optional[Iterable[str]] = None,
) -> nn.Module:
    """Convert ``model`` (in place, and returned) to sparse execution under ``active``.

    Args:
        model: a dense module; parameter names are preserved.
        active: the mask holder its sparse layers will read.
        only: names of the modules to convert (e.g. those a forward pass actually runs);
            None converts all. Modules outside ``only`` are left dense.
    Raises:
        UnsupportedLayerError: a leaf module on the converted path has no sparse version and is
            not known to be pointwise; the message names the module.
    """
    selected = None if only is None else set(only)

    def visit(parent: nn.Module, prefix: str) -> nn.Module:
        convert = _converter_for(parent)
        if convert is not None and (selected is None or prefix in selected):
            # SE modules are replaced whole: their children run on pooled [B, C, 1, 1] vectors.
            return convert(parent, active)
        children = list(parent.named_children())
        if not children and (selected is None or prefix in selected) and not isinstance(parent, SparseLayer):
            if not isinstance(parent, POINTWISE_LAYERS):
                raise UnsupportedLayerError(
                    f"layer '{prefix or type(parent).__name__}' ({type(parent).__module__}."
                    f"{type(parent).__qualname__}) has no sparse implementation in spark_det.sparse; "
                    "it could mix masked and visible positions. Add a sparse version or use another model."
                )
        for name, child in children:
            new = visit(child, f"{prefix}.{name}" if prefix else name)
            if new is not child:
                setattr(parent, name, new)
        return parent

    return visit(model, "")


def enable_sparse_sync_batchnorm(model: nn.Module, process_group: object = True) -> int:
    """Make every sparse BatchNorm all-reduce its statistics (``True``: the default group).

    Returns how many layers were switched. Use under DDP instead of nn.SyncBatchNorm.
    """
    layers = [m for m in model.modules() if isinstance(m, (SparseBatchNorm2d, SparseBatchNormAct2d))]
    for layer in layers:
        layer.sparse_sync = process_group
    return len(layers)


def modules_run_by(model: nn.Module, run: Callable[[], object]) -> list[str]:
    """Names of the modules that ``run()`` calls, in the order they first run."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        def hook(_m, _inp, _out, name=name):
            if name not in order:
                order.append(name)
        handles.append(module.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order


def first_layer_fed_masked_values(model: nn.Module, run: Callable[[], object]) -> Optional[str]:
    """Name of the first sparse layer whose input is non-zero at a masked position, or None.

    The invariant sparse execution rests on: every sparse layer sees exactly zero where the
    sparse image has no entries. A non-zero there comes from a layer before it that is not
    sparse-aware (e.g. an activation with f(0) != 0). ``run`` must run the model under its mask.
    """
    offenders: list[str] = []

    def check(name: str, layer: SparseLayer, x: torch.Tensor) -> None:
        if offenders or x.dim() != 4:
            return
        mask = layer.active.like(x, channels_last=layer.channels_last)
        if (x * (1 - mask)).abs().amax() > 0:
            offenders.append(name)

    handles = [
        module.register_forward_pre_hook(lambda m, inp, name=name: check(name, m, inp[0]))
        for name, module in model.named_modules()
        if isinstance(module, SparseLayer)
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return offenders[0] if offenders else None
