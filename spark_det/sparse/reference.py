"""The reference path: SparK's own emulation of sparse execution, kept as the definition of correct.

Like the reference code (github.com/keyu-tian/SparK, ``encoder.py``): every layer runs densely
on all positions and its output is re-masked, and normalisation layers gather the visible
vectors ``x[mask]`` into [N_visible, C], normalise them and scatter them back into zeros. It is
slow (most of the arithmetic is spent on masked positions, the norms copy whole tensors twice)
but obviously right; the fast path (:mod:`.blocks`) must reproduce its loss and
gradients, and the tests and ``benchmarks/pretrain_step.py`` compare the two.

Select it with ``SparseEncoder(..., impl="reference")``. Its BatchNorm statistics come from the
same core as the fast path's (:mod:`.norms`), so it also synchronises under DDP.
"""

from __future__ import annotations

from typing import Union

import torch
from timm.layers import BatchNormAct2d

from .layers import SparseLayer
from .masking import ActiveMask
from .norms import batch_norm_rows, layer_norm_rows

Where = Union[torch.Tensor, tuple[torch.Tensor, ...]]  # an index of [B, H, W]: bool mask or (b, h, w)


def gather_visible(x: torch.Tensor, mask: Where, channels_last: bool = False) -> torch.Tensor:
    """[B, C, H, W] (or [B, H, W, C]) -> [N_visible, C] by boolean indexing, as the reference does
    (``mask`` [B, H, W]), or by the (b, h, w) indices of the same positions (:func:`visible_where`)."""
    bhwc = x if channels_last else x.permute(0, 2, 3, 1)
    return bhwc[mask]


def scatter_visible(rows: torch.Tensor, mask: Where, like: torch.Tensor, channels_last: bool = False):
    """Inverse of :func:`gather_visible`: rows written into zeros shaped like ``like``."""
    bhwc = like if channels_last else like.permute(0, 2, 3, 1)
    out = torch.zeros_like(bhwc)
    out[mask] = rows.to(out.dtype)  # autocast may have run the norm in fp32
    return out if channels_last else out.permute(0, 3, 1, 2)


def visible_where(active: ActiveMask, size: tuple[int, int]) -> Where:
    """The visible positions at ``size`` as an index of [B, H, W]: the bool mask, or, when the
    mask's visible count is known, the (b, h, w) indices of the same positions in the same order
    (what boolean indexing computes, with a shape torch.compile knows before it reads the mask)."""
    if not active.count_known:
        return active.at(size)[:, 0]
    h, w = int(size[0]), int(size[1])
    rows = active.rows(size)
    sample, position = rows.div(h * w, rounding_mode="floor"), rows.remainder(h * w)
    return sample, position.div(w, rounding_mode="floor"), position.remainder(w)


class GatherScatterBatchNorm(SparseLayer):
    """BatchNorm2d / SyncBatchNorm / timm BatchNormAct2d over gathered visible vectors, normalised
    by the shared core (:func:`~spark_det.sparse.norms.batch_norm_rows`); ``sparse_sync``
    all-reduces the statistics as in the other paths. The fast path uses it too for BatchNorms
    outside its row blocks (a ResNet stem's): backward keeps only the visible vectors."""

    sparse_sync: object = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = visible_where(self.active, x.shape[2:4])
        rows = batch_norm_rows(gather_visible(x, mask), self, self.sparse_sync)
        if isinstance(self, BatchNormAct2d):
            rows = self.act(self.drop(rows))  # elementwise, so rows are fine
        return scatter_visible(rows, mask, x)


class GatherScatterLayerNorm(SparseLayer):
    """LayerNorm over gathered visible vectors (timm LayerNorm2d, or nn.LayerNorm on [B, H, W, C])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[1:3] if self.channels_last else x.shape[2:4]
        mask = visible_where(self.active, size)
        rows = gather_visible(x, mask, self.channels_last)
        out = layer_norm_rows(rows, self)
        return scatter_visible(out, mask, x, self.channels_last)


class GatherScatterLayerNormChannelsLast(GatherScatterLayerNorm):
    channels_last = True

