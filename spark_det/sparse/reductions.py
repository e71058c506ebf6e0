"""Reductions over positions, taken over visible positions only, inside the modules that pool.

Squeeze-excitation and its relatives (EfficientNet's ``SqueezeExcite``, ECA, CBAM's channel
attention, selective-kernel attention, ...) and statistics norms (FilterResponseNorm, EvoNorm)
compute a per-sample statistic over positions in their own ``forward`` code (``x.mean((2, 3))``,
``x.var(...)``, ``F.adaptive_avg_pool2d(x, 1)``), then run ordinary layers on the pooled
vectors. A dense mean would average in the masked zeros (and leak the mask ratio into every gate).

:class:`VisibleReductions` runs such a module's unchanged forward under a scoped
:class:`torch.overrides.TorchFunctionMode` that rewrites exactly those reductions, over the last
two (spatial) dimensions of a 4-D or 5-D tensor, into their visible-position versions with the
module's own mask; everything else runs as written. The layers that consume the pooled vectors
are left dense (they see one vector per sample, no positions); layers on spatial maps inside the
module are converted as anywhere else. No global state: the mode is entered and left around one
forward call, and nests (re-entrant).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .layers import SparseLayer
from .masking import ActiveMask
from .norms import visible_mean, visible_moments

_MEANS = {torch.mean, torch.Tensor.mean}
_VARIANCES = {torch.var: False, torch.Tensor.var: False, torch.std: True, torch.Tensor.std: True}
_MAXIMA = {torch.amax, torch.Tensor.amax}
_POOLS = {F.adaptive_avg_pool2d: "mean", F.adaptive_max_pool2d: "max"}


def _dims(dim: Any, ndim: int) -> Optional[tuple[int, ...]]:
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted(d % ndim for d in dims))


class VisibleReductionsMode(TorchFunctionMode):
    """Mean, var, std, amax and global adaptive pooling over positions -> over visible positions."""

    def __init__(self, active: ActiveMask) -> None:
        super().__init__()
        self.active = active

    def _mask(self, x: torch.Tensor, dims: Optional[tuple[int, ...]]) -> Optional[torch.Tensor]:
        """The mask broadcastable to ``x`` when the reduction spans its positions, else None."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5) or dims is None:
            return None
        spatial = {x.dim() - 2, x.dim() - 1}
        if not spatial <= set(dims) or x.shape[-2:] == (1, 1):
            return None
        mask = self.active.at(tuple(x.shape[-2:]), x.dtype)
        if mask.shape[0] != x.shape[0]:
            return None
        return mask.view(mask.shape[0], *([1] * (x.dim() - 3)), *mask.shape[-2:])

    def __torch_function__(self, func: Any, types: Any, args: Sequence = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func in _MEANS or func in _VARIANCES or func in _MAXIMA:
            handled = self._reduction(func, args, dict(kwargs))
            if handled is not None:
                return handled
        elif func in _POOLS:
            x, size = args[0], kwargs.get("output_size", args[1] if len(args) > 1 else None)
            mask = self._mask(x, (x.dim() - 2, x.dim() - 1)) if isinstance(x, torch.Tensor) else None
            if mask is not None and size in (1, (1, 1), [1, 1]) and not kwargs.get("return_indices", False):
                if _POOLS[func] == "mean":
                    return _visible_mean(x, mask, (x.dim() - 2, x.dim() - 1), True)
                return x.masked_fill(mask == 0, float("-inf")).amax((-2, -1), keepdim=True)
        return func(*args, **kwargs)

    def _reduction(self, func: Any, args: Sequence, kwargs: dict) -> Optional[torch.Tensor]:
        x, rest = args[0], list(args[1:])
        if not isinstance(x, torch.Tensor):
            return None
        dim = kwargs.pop("dim", rest.pop(0) if rest else None)
        dims = _dims(dim, x.dim())
        mask = self._mask(x, dims)
        if mask is None:
            return None
        if func in _VARIANCES:  # var(x, dim, unbiased, keepdim) or var(x, dim, *, correction, keepdim)
            unbiased = kwargs.pop("unbiased", rest.pop(0) if rest else True)
            keepdim = kwargs.pop("keepdim", rest.pop(0) if rest else False)
            correction = kwargs.pop("correction", None)
            correction = (1 if unbiased else 0) if correction is None else correction
            if kwargs or rest:
                return None
            variance = _visible_variance(x, mask, dims, correction, keepdim)
            return variance.sqrt() if _VARIANCES[func] else variance
        keepdim = kwargs.pop("keepdim", rest.pop(0) if rest else False)
        dtype = kwargs.pop("dtype", None) if func in _MEANS else None
        if kwargs or rest:
            return None
        if func in _MEANS:
            return _visible_mean(x if dtype is None else x.to(dtype), mask, dims, keepdim)
        return x.masked_fill(mask == 0, float("-inf")).amax(dims, keepdim=keepdim)


def _visible_mean(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    mean = visible_mean(x, mask, dims)
    return mean if keepdim else mean.squeeze(dims)


def _visible_variance(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...], correction: int,
                      keepdim: bool) -> torch.Tensor:
    _, biased, count = visible_moments(x, mask, dims)
    variance = (biased * (count / (count - correction).clamp_min(1)).to(biased.dtype)).to(x.dtype)
    return variance if keepdim else variance.squeeze(dims)


class VisibleReductions(SparseLayer):
    """A module's own forward with its reductions over positions taken over visible positions;
    an output map of the input's size is re-masked (a bias or a gate must not fill masked positions)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with VisibleReductionsMode(self.active):
            out = super().forward(x, *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dim() == 4 and isinstance(x, torch.Tensor) and x.dim() == 4 \
                and out.shape[-2:] == x.shape[-2:] and out.shape[-2:] != (1, 1):
            out = out * self.active.like(out)
        return out
