"""Per-layer sparse execution of an unchanged dense CNN (SparK, Tian et al. ICLR 2023, Sec. 3.1).

The masked image is treated as a set of visible patches: every layer must behave as if masked
positions did not exist. As in SparK's reference code this is emulated with dense kernels:

* per-position layers (conv, pooling, LayerNorm, Linear in channels-last blocks) run densely and
  their outputs are zeroed at masked positions, so masked positions hold exactly 0 at every scale;
  a convolution therefore sees zeros where the sparse image has no entries;
* layers that pool statistics over positions (BatchNorm, GroupNorm, squeeze-excitation) use
  masked reductions, i.e. statistics of the visible positions only (:mod:`.norms`); a plain
  BatchNorm2d normalises the gathered visible vectors instead (:mod:`.reference`), the same
  statistics, keeping less for backward.

Layers are converted *per instance*: :func:`~spark_det.sparse.convert.sparsify` copies each module
into a sparse subclass that shares its parameters and buffers, so parameter names (and thus timm
checkpoints) are unchanged and no timm or torch class is modified. The mask reaches the layers through the
:class:`~spark_det.sparse.masking.ActiveMask` of their own encoder, never through global state.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, DropPath, EffectiveSEModule, SEModule
from timm.layers import activations as timm_act
from timm.layers.grn import GlobalResponseNorm

from .masking import ActiveMask
from .norms import sparse_batch_norm, sparse_group_norm, visible_mean

# Elementwise or per-sample layers: they cannot move information between positions. Their output
# at masked positions is zeroed by the next sparse layer (and checked by `first_layer_fed_masked_values`).
POINTWISE_LAYERS: tuple[type, ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU,
    nn.PReLU, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.Dropout, DropPath,
    timm_act.Sigmoid, timm_act.HardSigmoid, timm_act.Swish, timm_act.Mish, timm_act.Tanh, timm_act.HardSwish,
    timm_act.HardMish, timm_act.GELU,
    timm_act.GELUTanh, timm_act.QuickGELU,
)


class UnsupportedLayerError(ValueError):
    """A layer on the encoder's forward path has no sparse implementation. (Not a TypeError: raised
    inside a tensor's ``__matmul__`` or ``__add__``, Python would turn that into NotImplemented.)"""


def dense_class(module: nn.Module) -> type:
    """The class a sparse layer was made from (``SparseSEModule`` -> ``SEModule``), else the module's own."""
    if not isinstance(module, SparseLayer):
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, SparseLayer) and c is not object)


def describe_layer(name: str, module: Optional[nn.Module], why: str) -> str:
    """"layer '<name>' (<module.Class>) <why>": how every refusal names the layer (by its dense class)."""
    cls = dense_class(module) if module is not None else None
    where = f"{cls.__module__}.{cls.__qualname__}" if cls is not None else "unknown class"
    return f"layer '{name or (cls.__name__ if cls else '?')}' ({where}) {why}"


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


class SparseBatchNormAct2d(SparseLayer, BatchNormAct2d):
    """timm's BatchNorm + activation (RegNet, ...) with visible-position statistics."""

    sparse_sync: object = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.active.like(x)
        x = sparse_batch_norm(x, mask, self, self.sparse_sync)
        return self.act(self.drop(x)) * mask


class SparseGroupNorm(SparseLayer, nn.GroupNorm):
    """GroupNorm over visible positions (SparK's reference code has none: its GroupNorm would
    count the masked zeros)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_group_norm(x, self.active.like(x), self)


class SparseGroupNormAct(SparseLayer):
    """timm's GroupNormAct / GroupNorm1Act (BiT, ResNetV2-GN): visible-position GroupNorm, then
    drop and activation as timm's forward, and masked positions zeroed again (an activation such
    as GELU of 0 is 0, but not every one is)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.active.like(x)
        return self.act(self.drop(sparse_group_norm(x, mask, self))) * mask


class SparseSEModule(SparseLayer, SEModule):
    """Squeeze-excitation whose squeeze averages visible positions only (a dense global pool
    would average in the masked zeros and leak the mask ratio into every gate)."""

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
