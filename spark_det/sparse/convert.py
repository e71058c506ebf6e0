"""Converting a dense timm CNN to sparse execution, and checking the result.

:func:`sparsify` swaps modules, per instance, for sparse versions that share their parameters
(so parameter names and checkpoints are unchanged): whole blocks for the fast path
(:mod:`.blocks`), single layers otherwise (:mod:`.layers`, :mod:`.reference`). Layers it does
not know are refused, not run densely.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, EffectiveSEModule, LayerNorm2d, SEModule
from timm.layers.grn import GlobalResponseNorm
from timm.layers.norm import LayerNorm2dFp32
from timm.layers.norm_act import (
    GroupNorm1Act,
    GroupNormAct,
    LayerNormAct,
    LayerNormAct2d,
    LayerNormAct2dFp32,
    LayerNormActFp32,
)

from .blocks import RowBlock, row_block_for
from .layers import (
    POINTWISE_LAYERS,
    RemaskOutput,
    RemaskOutputChannelsLast,
    SparseBatchNorm2d,
    SparseBatchNormAct2d,
    SparseEffectiveSEModule,
    SparseGlobalResponseNorm,
    SparseGroupNorm,
    SparseGroupNormAct,
    SparseLayer,
    SparseSEModule,
    sparse_subclass,
)
from .masking import ActiveMask
from .reference import (
    GatherScatterBatchNorm,
    GatherScatterLayerNorm,
    GatherScatterLayerNormChannelsLast,
)


class UnsupportedLayerError(TypeError):
    """A layer on the encoder's forward path has no sparse implementation."""


IMPLEMENTATIONS = ("fast", "reference")


def _converter_for(module: nn.Module, impl: str) -> Optional[Callable[[nn.Module, ActiveMask], nn.Module]]:
    """The sparse replacement for ``module``, or None when it needs none (pointwise/container)."""
    if isinstance(module, SparseLayer):
        return None
    # Norms with an activation: their whole forward (norm, drop, act) is kept, on both paths.
    # LayerNorm normalises each position on its own, so the dense forward re-masked is exact.
    if isinstance(module, (LayerNormAct2d, LayerNormAct2dFp32)):
        return sparse_subclass(type(module), RemaskOutput).adopt
    if isinstance(module, (LayerNormAct, LayerNormActFp32)):
        return sparse_subclass(type(module), RemaskOutputChannelsLast).adopt
    if isinstance(module, (GroupNormAct, GroupNorm1Act)):
        return sparse_subclass(type(module), SparseGroupNormAct).adopt
    if impl == "fast":
        block = row_block_for(module)
        if block is not None:
            return block.adopt
    else:
        reference = _reference_converter_for(module)
        if reference is not None:
            return reference
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
        return sparse_subclass(type(module), RemaskOutput).adopt
    if isinstance(module, (nn.LayerNorm, nn.Linear)):  # on 4-D input both act on the last (channel) dim
        return sparse_subclass(type(module), RemaskOutputChannelsLast).adopt
    return None


def _reference_converter_for(module: nn.Module) -> Optional[Callable[[nn.Module, ActiveMask], nn.Module]]:
    if isinstance(module, (BatchNormAct2d, nn.BatchNorm2d, nn.SyncBatchNorm)):
        return sparse_subclass(type(module), GatherScatterBatchNorm).adopt
    if isinstance(module, (LayerNorm2d, LayerNorm2dFp32)):
        return sparse_subclass(type(module), GatherScatterLayerNorm).adopt
    if isinstance(module, nn.LayerNorm):
        return sparse_subclass(type(module), GatherScatterLayerNormChannelsLast).adopt
    return None


def sparsify(
    model: nn.Module,
    active: ActiveMask,
    only: Optional[Iterable[str]] = None,
    impl: str = "fast",
) -> nn.Module:
    """Convert ``model`` (in place, and returned) to sparse execution under ``active``.

    Args:
        model: a dense module; parameter names are preserved.
        active: the mask holder its sparse layers will read.
        only: names of the modules to convert (e.g. those a forward pass actually runs);
            None converts all. Modules outside ``only`` are left dense.
        impl: 'fast' (standard ResNet / ConvNeXt blocks run on visible rows,
            :mod:`.blocks`; other layers use masked reductions) or 'reference'
            (dense layers + re-masking, norms over gathered vectors, :mod:`.reference`).
    Raises:
        UnsupportedLayerError: a leaf module on the converted path has no sparse version and is
            not known to be pointwise; the message names the module.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    selected = None if only is None else set(only)

    def visit(parent: nn.Module, prefix: str) -> nn.Module:
        convert = _converter_for(parent, impl)
        if convert is not None and (selected is None or prefix in selected):
            # SE modules and row blocks are replaced whole: their children run on pooled
            # [B, C, 1, 1] vectors or on gathered rows.
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
    """Make every sparse BatchNorm (and row block) all-reduce its statistics (``True``: the default group).

    Returns how many layers were switched. Use under DDP instead of nn.SyncBatchNorm.
    """
    synchronised = (SparseBatchNorm2d, SparseBatchNormAct2d, RowBlock, GatherScatterBatchNorm)
    layers = [m for m in model.modules() if isinstance(m, synchronised)]
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
