"""Converting a dense timm CNN to sparse execution, and checking the result.

:func:`sparsify` swaps modules, per instance, for sparse versions that share their parameters
(so parameter names and checkpoints are unchanged): whole blocks for the fast path
(:mod:`.blocks`), single layers otherwise (:mod:`.layers`, :mod:`.reference`). Layers it does
not know are refused, not run densely.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn
from timm.layers import (
    BatchNormAct2d,
    BlurPool2d,
    EffectiveSEModule,
    LayerNorm2d,
    SEModule,
    evo_norm,
    filter_response_norm,
)
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
    SparseBatchNormAct2d,
    SparseEffectiveSEModule,
    SparseGlobalResponseNorm,
    SparseGroupNorm,
    SparseGroupNormAct,
    SparseLayer,
    SparseSEModule,
    UnsupportedLayerError,
    describe_layer,
    sparse_subclass,
)
from .masking import ActiveMask
from .reductions import Audit, VisibleReductions
from .reference import (
    GatherScatterBatchNorm,
    GatherScatterLayerNorm,
    GatherScatterLayerNormChannelsLast,
)

IMPLEMENTATIONS = ("fast", "reference")
# Norms whose statistics over positions are computed in their own forward (x.var((2, 3)), ...):
# run unchanged with those reductions over visible positions (:mod:`.reductions`).
STATISTICS_NORMS: tuple[type, ...] = (
    filter_response_norm.FilterResponseNormTlu2d, filter_response_norm.FilterResponseNormAct2d,
    evo_norm.EvoNorm2dB0, evo_norm.EvoNorm2dB1, evo_norm.EvoNorm2dB2,
    evo_norm.EvoNorm2dS0, evo_norm.EvoNorm2dS0a, evo_norm.EvoNorm2dS1, evo_norm.EvoNorm2dS1a,
    evo_norm.EvoNorm2dS2, evo_norm.EvoNorm2dS2a,
)


@dataclass
class ProbeRecord:
    """What a dense probe forward showed of each module it ran: order and tensor shapes, and (with
    an audit, :class:`.reductions.Audit`) the reductions over positions in each module's own code."""

    order: list[str] = field(default_factory=list)
    inputs: dict[str, Optional[tuple[int, ...]]] = field(default_factory=dict)  # first tensor argument
    outputs: dict[str, Optional[tuple[int, ...]]] = field(default_factory=dict)
    reducers: dict[str, list[str]] = field(default_factory=dict)  # module -> convertible reductions
    refusals: dict[str, list[str]] = field(default_factory=dict)  # module -> what cannot run sparsely


def _shape(value: object) -> Optional[tuple[int, ...]]:
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def trusted_in_audit(impl: str) -> Callable[[str, nn.Module], bool]:
    """Modules whose code the audit need not read: those replaced by spark-det's own sparse
    version (except :class:`VisibleReductions`, which runs the module's own code) and activations."""
    def trusted(name: str, module: nn.Module) -> bool:
        if isinstance(module, (POINTWISE_LAYERS, SparseLayer)) and not isinstance(module, VisibleReductions):
            return True
        convert = _converter_for(module, impl)
        return convert is not None and not issubclass(getattr(convert, "__self__", object), VisibleReductions)

    return trusted


def probe_modules(model: nn.Module, run: Callable[[], object], audit_input: Optional[torch.Tensor] = None,
                  impl: str = "fast") -> ProbeRecord:
    """Run ``run()`` (a dense forward) and record every module it calls, in order, with shapes.

    With ``audit_input`` (the image tensor ``run`` feeds the model) the forward also runs under the
    construction audit (:class:`.reductions.Audit`): which modules reduce over positions in their
    own code, and what in them cannot run sparsely.
    """
    record = ProbeRecord()
    if audit_input is not None:
        audit = Audit(model, trusted_in_audit(impl))
        inner = run

        def run() -> object:
            return audit.run(audit_input, lambda _images: inner())

    handles = []
    for name, module in model.named_modules():
        def hook(_m, inputs, output, name=name):
            if name not in record.inputs:
                record.order.append(name)
                record.inputs[name], record.outputs[name] = _shape(inputs), _shape(output)
        handles.append(module.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if audit_input is not None:
        record.reducers, record.refusals = audit.reducers, audit.refusals
    return record


def is_pooled(shape: Optional[tuple[int, ...]]) -> bool:
    """A tensor without positions: [B, C], [B, 1, C] (ECA), [B, C, 1, 1] or [B, 1, 1, C]. The probe
    runs at twice the downsample ratio, so every real feature map has at least 2x2 positions."""
    if shape is None:
        return False
    return len(shape) < 4 or tuple(shape[-2:]) == (1, 1) or (len(shape) == 4 and tuple(shape[1:3]) == (1, 1))


@dataclass
class PooledPlan:
    """Where a model pools: the modules that run on pooled vectors (left dense: one vector per
    sample, no positions) and the modules whose own forward does the pooling (their reductions
    over positions are taken over visible positions, :mod:`.reductions`)."""

    on_pooled: set[str]
    owners: set[str]

    @classmethod
    def of(cls, model: nn.Module, record: ProbeRecord) -> "PooledPlan":
        leaves = {name for name, m in model.named_modules() if not list(m.children())}
        on_pooled = {n for n in record.order if n and is_pooled(record.inputs[n])}
        owners = set()
        for name in on_pooled:
            ancestors = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)] + [""]
            if any(a in on_pooled for a in ancestors):
                continue  # inside a module that already runs on pooled vectors
            owner = next((a for a in ancestors if a in record.inputs and not is_pooled(record.inputs[a])), "")
            if owner == "":
                raise UnsupportedLayerError(describe_layer(name, dict(model.named_modules())[name],
                                                        "runs on pooled vectors that no module of the model pools"))
            owners.add(owner)
        # a leaf that pools by itself (nn.AdaptiveAvgPool2d(1), ...)
        owners |= {n for n in record.order if n in leaves and not is_pooled(record.inputs[n])
                   and is_pooled(record.outputs[n])}
        # and every module whose own code reduces over positions (the audit), however it is spelled
        if "" in record.reducers:
            raise UnsupportedLayerError(describe_layer("", model, "reduces over positions in the model's own "
                                                       f"forward ({record.reducers[''][0]})"))
        owners |= set(record.reducers)
        return cls(on_pooled, owners)



def acts_per_position(module: nn.Module, shape: tuple[int, ...]) -> Optional[bool]:
    """Whether ``module`` maps each position of its [B, C, H, W] (True) or [B, H, W, C] (False)
    input on its own, so that running it densely and re-masking is exact; None if not.

    The layout comes from the probe's square maps (H == W); the property is tested, not assumed:
    on a float64 copy with random parameters, changing one input element must change only the
    outputs of its own sample and position.
    """
    if len(shape) != 4:
        return None
    channels_first = shape[2] == shape[3]
    if not channels_first and shape[1] != shape[2]:
        return None
    probe = copy.deepcopy(module).double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5 + 0.5)
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        # exact zeros at every other position, as masked positions hold: a layer that treats a zero
        # differently (x == 0, a minimum) must show it when one of them is perturbed (the first point below)
        if channels_first:
            x[..., ::2, ::2] = 0
        else:
            x[:, ::2, ::2, :] = 0
        try:
            y = probe(x)
        except Exception:  # noqa: BLE001 (whatever fails here is not a per-position layer)
            return None
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            return None
        for b, i, j, k in ((0, 0, 0, 0), tuple(n - 1 for n in shape), (0, shape[1] // 2, shape[2] // 2, 0)):
            x2 = x.clone()
            x2[b, i, j, k] += 1.0
            elsewhere = (probe(x2) - y).abs() > 0
            if channels_first:
                elsewhere[b, :, j, k] = False
            else:
                elsewhere[b, i, j, :] = False
            if elsewhere.any():
                return None
    return channels_first


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
    if isinstance(module, STATISTICS_NORMS):
        return sparse_subclass(type(module), VisibleReductions).adopt
    if isinstance(module, BlurPool2d):  # a fixed depthwise filter: a convolution
        return sparse_subclass(type(module), RemaskOutput).adopt
    # A BatchNorm outside the row blocks (e.g. a ResNet stem's) normalises the gathered visible
    # vectors on both paths: its backward keeps those, not the whole map.
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not isinstance(module, BatchNormAct2d):
        return sparse_subclass(type(module), GatherScatterBatchNorm).adopt
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
    if isinstance(module, BatchNormAct2d):
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
    probe: Optional[ProbeRecord] = None,
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
        probe: a dense forward's :class:`ProbeRecord` (``only`` defaults to the modules it ran).
            With it, the structure decides the rest: modules that run on pooled vectors stay
            dense, the modules that pool get visible-position reductions (:class:`PooledPlan`),
            and a layer of unknown type that acts per position (tested) is run densely and re-masked.
    Raises:
        UnsupportedLayerError: a leaf module on the converted path has no sparse version and is
            not known to be pointwise; the message names the module and its class.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if only is None and probe is not None:
        only = probe.order
    selected = None if only is None else set(only)
    plan = PooledPlan.of(model, probe) if probe is not None else PooledPlan(set(), set())

    per_position: set[str] = set()
    trusted = trusted_in_audit(impl)
    modules = dict(model.named_modules())
    unknown_owners = [o for o in plan.owners if o in modules and not trusted(o, modules[o])]

    def visit(parent: nn.Module, prefix: str) -> nn.Module:
        chosen = selected is None or prefix in selected
        if chosen and prefix in plan.on_pooled:
            return parent  # one vector per sample: nothing to mask
        children = list(parent.named_children())
        if chosen and prefix in plan.owners and not children and not isinstance(parent, SparseLayer):
            # a leaf that pools (a global pool; a max pool whose window covers the map)
            return sparse_subclass(type(parent), VisibleReductions).adopt(parent, active, prefix)
        convert = _converter_for(parent, impl)
        if convert is not None and children and any(o.startswith(f"{prefix}.") for o in unknown_owners):
            # a module holding an unknown one whose own code reduces over positions (a gate a user
            # put into a block the fast path knows) is not replaced whole: its children are
            # converted one by one, that one to visible positions
            convert = None
        if convert is not None and chosen:
            # SE modules and row blocks are replaced whole: their children run on pooled
            # [B, C, 1, 1] vectors or on gathered rows.
            new = convert(parent, active)
            if isinstance(new, VisibleReductions):
                new.sparse_name = prefix
            return new
        # a leaf, or a module made only of activations around its own code (timm's StarReLU:
        # s * relu(x)**2 + b, whose trained bias would fill masked positions)
        leaf_like = not children or all(isinstance(m, POINTWISE_LAYERS) for m in parent.modules() if m is not parent)
        if leaf_like and chosen and not isinstance(parent, SparseLayer):
            if isinstance(parent, POINTWISE_LAYERS):
                return parent
            layout = acts_per_position(parent, probe.inputs[prefix]) if probe and probe.inputs.get(prefix) else None
            if layout is None:
                raise UnsupportedLayerError(describe_layer(
                    prefix, parent, "has no sparse implementation in spark_det.sparse and is not a per-position "
                    "layer: it could mix masked and visible positions. Add a sparse version or use another model."))
            per_position.add(prefix)
            return sparse_subclass(type(parent), RemaskOutput if layout else RemaskOutputChannelsLast).adopt(
                parent, active)
        for name, child in children:
            new = visit(child, f"{prefix}.{name}" if prefix else name)
            if new is not child:
                setattr(parent, name, new)
        if chosen and prefix in plan.owners:
            return sparse_subclass(type(parent), VisibleReductions).adopt(parent, active, prefix)
        return parent

    converted = visit(model, "")
    if probe is not None:  # what the audit found that no conversion covers: refused before any training
        modules = dict(model.named_modules())
        for name, found in probe.refusals.items():
            exempt = name in per_position and all("not recognised" in f for f in found)  # tested per position
            if not exempt and (selected is None or name in selected):
                raise UnsupportedLayerError(describe_layer(name, modules.get(name), f"computes {found[0]}; it "
                                                           "cannot run sparsely (use another model or add a sparse "
                                                           "version of the block)"))
    return converted


@contextlib.contextmanager
def naming_the_failing_layer(model: nn.Module) -> Iterator[None]:
    """Within it, an error raised inside a module of ``model`` is re-raised as an
    :class:`UnsupportedLayerError` naming the innermost module it came from."""
    stack: list[str] = []
    failed: list[str] = []
    handles = []
    def enter(name: str) -> None:
        stack.append(name)

    def leave() -> None:  # a forward hook that returned a value would replace the module's output
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, i, name=name: enter(name)))
        handles.append(module.register_forward_hook(lambda m, i, o: leave()))
    try:
        yield
    except UnsupportedLayerError:
        raise
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as exc:
        failed = stack[-1:]
        if not failed:
            raise
        module = dict(model.named_modules())[failed[0]]
        raise UnsupportedLayerError(describe_layer(failed[0], module, f"fails under sparse execution: "
                                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                                    ) from exc
    finally:
        for h in handles:
            h.remove()


def enable_sparse_sync_batchnorm(model: nn.Module, process_group: object = True) -> int:
    """Make every sparse BatchNorm (and row block) all-reduce its statistics (``True``: the default group).

    Returns how many layers were switched. Use under DDP instead of nn.SyncBatchNorm.
    """
    synchronised = (SparseBatchNormAct2d, RowBlock, GatherScatterBatchNorm)
    layers = [m for m in model.modules() if isinstance(m, synchronised)]
    for layer in layers:
        layer.sparse_sync = process_group
    return len(layers)


def modules_run_by(model: nn.Module, run: Callable[[], object]) -> list[str]:
    """Names of the modules that ``run()`` calls, in the order they first run."""
    return probe_modules(model, run).order


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
