"""The leak probe: does any visible feature of a sparse encoder depend on masked patches?

SparK's promise is that nothing from masked patches reaches a visible feature. Changing the
pixels inside masked patches cannot test it (the encoder zeroes them before the first layer);
what can leak is the masked *area*: a statistic that counts masked positions (a dense BatchNorm,
mean or softmax) or a max/min over positions that sees their zeros. The probe runs a float64
copy of the encoder in train mode on a tiny image and checks three properties:

1. every sparse layer receives exactly 0 at masked positions, and so do the outputs;
2. the image padded on the right with one and with two images' width of masked patches gives the
   same features on their common part and the same pooled vectors (a count of masked positions
   changes with their number);
3. an image with every patch visible and the same image padded with masked patches give the same
   pooled vectors (a max or min over positions that counts a masked zero, which property 2 cannot
   see since both of its paddings contain zeros, changes the moment any patch is masked); in eval
   mode, so that batch statistics over the few positions one patch leaves cannot amplify rounding.

``randomise=True`` (the construction check) first gives every parameter and buffer random values
of the kind training produces: zero-initialised last layers, gates and layer scales would
otherwise hide a leak until the weights train. ``randomise=False`` audits the weights as they are
(a loaded checkpoint, a run in progress). A failure names the module whose own code makes the
difference, not the first layer that consumes it.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropBlock2d, DropPath

from ..sparse.convert import first_layer_fed_masked_values, is_pooled
from ..sparse.layers import dense_class
from ..sparse.masking import upsample_mask

if TYPE_CHECKING:
    from .encoder import SparseEncoder

T = TypeVar("T")
STOCHASTIC_LAYERS = (nn.modules.dropout._DropoutNd, DropPath, DropBlock2d)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_RANGES = {"weight": (0.5, 1.5), "bias": (-1.0, 1.0), "running_mean": (-1.0, 1.0), "running_var": (0.5, 2.0)}


def _uniform(tensor: torch.Tensor, low: float, high: float, generator: torch.Generator) -> None:
    tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * (high - low) + low)


@torch.no_grad()
def randomise_norm(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics of a norm (fresh ones map zeros to zeros)."""
    if not isinstance(module, NORMS):
        return
    for name, (low, high) in _RANGES.items():
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            _uniform(tensor, low, high, generator)


@torch.no_grad()
def randomise_like_training(model: nn.Module, generator: torch.Generator) -> None:
    """Every floating-point parameter and buffer of ``model`` random, as training would leave them.

    Weights (2-D and up) ~ N(0, 1/fan_in), so that activations keep their scale through a deep
    network; 1-D scales and gates (norm weights, layer-scale gammas, learned gains) ~ U(0.5, 1.5);
    biases ~ U(-1, 1); running statistics as :func:`randomise_norm`. Nothing stays at the zero or
    one a constructor chose (timm zero-initialises last norms, context MLPs and layer scales).
    """
    for module in model.modules():
        if isinstance(module, NORMS):
            randomise_norm(module, generator)
            continue
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is None or not tensor.is_floating_point():
                continue
            if tensor.dim() >= 2:
                fan_in = max(1, tensor[0].numel())
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) / math.sqrt(fan_in))
            elif name in _RANGES:
                _uniform(tensor, *_RANGES[name], generator)
            else:
                _uniform(tensor, 0.5, 1.5, generator)


def module_io(model: nn.Module, run: Callable[[], T]) -> tuple[T, dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                               list[str]]:
    """``run()``'s result, the first tensor input and output of every module of ``model``, and the
    order in which modules finished."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    finished: list[str] = []

    def keep(name: str, args: tuple, output: object) -> None:  # returns None: a hook's value replaces the output
        if name in outputs or not isinstance(output, torch.Tensor):
            return
        outputs[name] = output
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None:
            inputs[name] = first
        finished.append(name)

    handles = [m.register_forward_hook(lambda _m, i, o, name=name: keep(name, i, o))
               for name, m in model.named_modules()]
    try:
        return run(), inputs, outputs, finished
    finally:
        for h in handles:
            h.remove()


def module_outputs(model: nn.Module, run: Callable[[], T]) -> tuple[T, dict[str, torch.Tensor]]:
    """``run()``'s result and the first tensor output of every module of ``model``, in run order."""
    result, _, outputs, _ = module_io(model, run)
    return result, outputs


def same_on_common_part(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` (the same input with more masked patches on the right) equals ``a`` where
    they overlap: the last dimension (channels first) or the width dimension (channels last)
    may be longer in ``b``; same-shaped tensors (pooled vectors) must be equal."""
    if a.shape != b.shape:
        if a.dim() != b.dim() or a.dim() < 3:
            return True  # not a map this comparison understands
        differ = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
        if len(differ) != 1:
            return True
        b = b.narrow(differ[0], 0, a.shape[differ[0]])
    # A float64 probe, but norms that compute in float32 (FRN, EvoNorm) carry rounding noise that
    # grows to ~1e-4 relative over 50 layers; a statistic that counts masked positions is off by
    # tens of percent (the probe adds as many masked positions as the image has), so 1e-3 separates them.
    both_nan = a.isnan() & b.isnan()  # e.g. the std of one position, the same on both sides
    difference = (a - b).abs().masked_fill(both_nan, 0).nan_to_num(nan=float("inf"))
    scale = a.masked_fill(both_nan, 0).abs().max().item()
    return bool(difference.max() <= 1e-3 * max(1.0, scale))


def culprit(model: nn.Module, run_a: tuple, run_b: tuple, differs: Callable[[torch.Tensor, torch.Tensor], bool],
            only: Callable[[torch.Tensor, torch.Tensor], bool] = lambda a, b: True) -> Optional[str]:
    """The module whose own code first makes runs ``a`` and ``b`` differ.

    The first module (in finishing order) whose output differs is where the difference shows; if
    its input differs too, the difference was made before it, in code no earlier module ran: the
    own code of its innermost ancestor whose input does not differ (a block that pools with a
    softmax, then feeds a consumer layer).
    """
    _, inputs_a, outputs_a, finished = run_a
    _, inputs_b, outputs_b, _ = run_b

    def changed(store_a: dict, store_b: dict, name: str) -> bool:
        return name in store_a and name in store_b and only(store_a[name], store_b[name]) \
            and differs(store_a[name], store_b[name])

    first = next((n for n in finished if changed(outputs_a, outputs_b, n)), None)
    if first is None:
        return None
    name = first
    while name and changed(inputs_a, inputs_b, name):
        name = name.rpartition(".")[0]
    return name


def _names(model: nn.Module, name: Optional[str]) -> str:
    if name is None:
        return "a layer"
    return f"layer '{name}' ({dense_class(model.get_submodule(name)).__qualname__})" if name else \
        f"the model's own code ({type(model).__qualname__})"


def _pooled(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Pooled vectors (the same shape in both runs; a map that is 1x1 in one run is still a map)."""
    return a.shape == b.shape and is_pooled(tuple(a.shape))


@torch.no_grad()
def find_leak(encoder: "SparseEncoder", randomise: bool = True, seed: int = 0, copy_first: bool = True
              ) -> Optional[str]:
    """None when ``encoder`` is leak-free on the probe, else a one-line finding naming the layer.

    Runs on a float64 CPU copy (``copy_first=False``: on ``encoder`` itself, a copy the caller made).
    """
    probe = (copy.deepcopy(encoder) if copy_first else encoder).cpu().double().train()
    generator = torch.Generator().manual_seed(seed)
    for module in probe.modules():
        if isinstance(module, STOCHASTIC_LAYERS):
            module.eval()  # the same draws in every pass
    if randomise:
        randomise_like_training(probe, generator)
    start = copy.deepcopy(probe.state_dict())  # train mode updates running statistics: every pass starts here
    name = encoder.model_name
    r = encoder.downsample_ratio
    images = torch.randn(2, 3, 2 * r, 2 * r, generator=generator, dtype=torch.float64)
    visible = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool).view(2, 1, 2, 2)

    def run(pixels: torch.Tensor, mask: torch.Tensor) -> tuple:
        probe.load_state_dict(start)
        return module_io(probe.model, lambda: probe(pixels, mask))

    probe.load_state_dict(start)
    offender = first_layer_fed_masked_values(probe.model, lambda: probe(images, visible))
    if offender is not None:
        return (f"{name}: layer '{offender}' receives non-zero values at masked positions; "
                "a layer before it is not sparse-aware, so masked positions would not be empty")

    def padded(times: int, mask: torch.Tensor = visible) -> tuple:
        return run(F.pad(images, (0, times * 2 * r)), F.pad(mask, (0, times * 2)))

    once, twice = padded(1), padded(2)
    for level, (a, b) in enumerate(zip(once[0], twice[0])):
        if not same_on_common_part(a, b):
            where = _names(probe.model, culprit(probe.model, once, twice, lambda x, y: not same_on_common_part(x, y)))
            return (f"{name}: features at scale {level} change when masked patches are added: {where} counts "
                    "masked positions in a statistic or pooled value (it has no sparse version)")
        masked = ~upsample_mask(F.pad(visible, (0, 2)), a.shape[-2:])
        if a.masked_select(masked).abs().max() > 0:
            return f"{name}: features at scale {level} are not empty at masked positions"
    # 3: one visible patch alone vs the same patch with masked ones beside it (pooled vectors only:
    # a pooling window at the map's edge may legitimately see zero padding or masked zeros
    # differently). One patch keeps few positions per map, so that with random biases some channel
    # is one-signed over all of them and a max or min that counts a masked zero shows.
    # In eval mode: batch statistics are property 2's subject, and over the two values per channel
    # that one patch per image leaves at the last stage, they amplify float64 rounding geometrically
    # through the stages (regnetz_005, reference path: 3e-16 at the first SE, 1e-2 at the last
    # block), a difference no reduction over positions made.
    probe.eval()
    one = visible[:, :, :1, :1] | True
    alone, beside = run(images[..., :r, :r], one), run(F.pad(images[..., :r, :r], (0, 3 * r)), F.pad(one, (0, 3)))
    where = culprit(probe.model, alone, beside, lambda x, y: not same_on_common_part(x, y), only=_pooled)
    if where is not None:
        return (f"{name}: pooled values change when any patch is masked: {_names(probe.model, where)} counts "
                "masked positions in a maximum, minimum or other reduction over positions")
    return None
