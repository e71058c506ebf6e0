"""Random patch masks on the encoder's coarsest grid, and the scoped holder sparse layers read.

Convention everywhere in spark-det: ``visible`` is a bool tensor [B, 1, h, w], True where the
patch is kept (SparK's "active" positions), on the grid of the encoder's coarsest feature map.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch


def num_visible(grid_hw: tuple[int, int], mask_ratio: float) -> int:
    """Patches kept per image: round(h * w * (1 - mask_ratio)), at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    h, w = grid_hw
    return max(1, round(h * w * (1.0 - mask_ratio)))


def random_visible_mask(
    batch_size: int,
    grid_hw: tuple[int, int],
    mask_ratio: float,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-image random mask with exactly ``num_visible`` True patches: [B, 1, h, w] bool.

    Reproducible from ``generator`` (drawn on the generator's device, then moved to ``device``).
    """
    h, w = grid_hw
    keep = num_visible(grid_hw, mask_ratio)
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, h * w, generator=generator, device=gen_device)
    keep_idx = noise.argsort(dim=1)[:, :keep]  # [B, keep]
    visible = torch.zeros(batch_size, h * w, dtype=torch.bool, device=gen_device)
    visible.scatter_(1, keep_idx, True)
    return visible.view(batch_size, 1, h, w).to(device if device is not None else gen_device)


def upsample_mask(visible: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a [B, 1, h, w] mask to ``size``, which must be a multiple of (h, w)."""
    h, w = visible.shape[-2:]
    if size[0] % h or size[1] % w:
        raise ValueError(
            f"feature map {tuple(size)} is not a multiple of the mask grid {(h, w)}, so the mask cannot be "
            "placed on it (a layer that pads or crops its map, or an input size the grid does not divide)"
        )
    return visible.repeat_interleave(size[0] // h, dim=2).repeat_interleave(size[1] // w, dim=3)


def check_visible_count(visible: torch.Tensor, per_image: int) -> None:
    """Assert, without waiting for the device, that every image of ``visible`` has ``per_image``
    visible patches (on a GPU a failure surfaces at the next synchronisation)."""
    if not torch.compiler.is_compiling():  # compiled code trusts its caller (see ActiveMask)
        counts = visible.flatten(1).sum(1)
        torch._assert_async((counts == per_image).all(), f"a mask does not have {per_image} visible patches per image")


def select_static(values: torch.Tensor, keep: torch.Tensor, count: int) -> torch.Tensor:
    """``values[keep]`` for 1-D tensors when ``keep`` has exactly ``count`` True entries, in order.

    The output's shape is known without reading ``keep`` (no host synchronisation, no dynamic
    shape under torch.compile): each kept value is scattered to its rank among the kept ones,
    the others into one spare slot past the end, which is cut off.
    """
    slot = torch.where(keep, keep.cumsum(0) - 1, count)
    out = values.new_zeros(count + 1)
    return out.scatter_(0, slot, values)[:count]


def _index_dtype(numel: int) -> torch.dtype:
    """int32 row indices where they fit: autograd keeps them for every gather and scatter, and
    int64 ones would make the fast path keep more than the reference's boolean masks."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


class ActiveMask:
    """The visibility mask of the forward pass in progress, shared by one encoder's sparse layers.

    Replaces the reference code's module-level global: every sparse layer receives the holder of
    its own encoder at conversion time, so two encoders in one process never see each other's
    mask. ``use`` is a context manager and re-entrant (a stack), and the per-resolution masks are
    computed once per forward pass and cached for the duration of the outermost context that
    uses the same mask.

    ``per_image`` (optional) is the number of visible patches of every image of the mask, when the
    caller knows it (SparK's random masks: it is fixed by the mask ratio). Row indices then have a
    shape known before the mask's values are, which is what ``torch.compile`` needs (boolean
    indexing has a data-dependent shape: a graph break at every resolution); without it they
    come from boolean indexing. Both give the same indices.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[torch.Tensor, dict, Optional[int]]] = []

    @contextmanager
    def use(self, visible: torch.Tensor, per_image: Optional[int] = None) -> Iterator[None]:
        if visible.dim() != 4 or visible.shape[1] != 1 or visible.dtype != torch.bool:
            raise ValueError(f"visible mask must be bool [B, 1, h, w], got {visible.dtype} {tuple(visible.shape)}")
        # A nested use of the same mask (SparK's densify inside its prediction) shares the cache:
        # one index tensor per resolution, not a copy per context that backward would keep too.
        shared = self._stack and self._stack[-1][0] is visible
        if shared and per_image is None:
            per_image = self._stack[-1][2]
        elif per_image is not None:
            check_visible_count(visible, per_image)
        self._stack.append((visible, self._stack[-1][1] if shared else {}, per_image))
        try:
            yield
        finally:
            self._stack.pop()

    @property
    def is_set(self) -> bool:
        return bool(self._stack)

    @property
    def count_known(self) -> bool:
        """Whether the current mask's visible count per image is known (row indices of static shape)."""
        return self._current()[2] is not None

    def _current(self) -> tuple[torch.Tensor, dict, Optional[int]]:
        if not self._stack:
            raise RuntimeError(
                "a sparse layer ran without a mask: call it through SparseEncoder.forward(x, visible) "
                "(or inside `with active_mask.use(visible):`)"
            )
        return self._stack[-1]

    def at(self, size: tuple[int, int], dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The current mask at spatial ``size`` as [B, 1, H, W] in ``dtype``."""
        visible, cache, _ = self._current()
        key = (int(size[0]), int(size[1]), dtype)
        if key not in cache:
            cache[key] = upsample_mask(visible, key[:2]).to(dtype)
        return cache[key]

    def rows(self, size: tuple[int, int], stride: int = 1) -> torch.Tensor:
        """Flat indices (into [B * H * W], row-major) of the visible positions at ``size``.

        With ``stride`` s the indices are those of the visible positions of the s-times coarser
        grid, expressed at ``size`` (what a stride-s 1x1 convolution reads), in the same order as
        ``rows`` of that coarser grid. Cached for the duration of the context like :meth:`at`.
        """
        visible, cache, per_image = self._current()
        key = ("rows", int(size[0]), int(size[1]), int(stride))
        if key not in cache:
            full = self.at(size)  # [B, 1, H, W]
            n = full.numel()
            positions = torch.arange(n, device=full.device, dtype=_index_dtype(n)).view(full.shape)
            if stride > 1:
                full, positions = full[..., ::stride, ::stride], positions[..., ::stride, ::stride]
            # Each visible patch covers (fh / s) x (fw / s) positions of the strided grid when s
            # divides the upsampling factor; otherwise how many it covers depends on where it is.
            fh, fw = int(size[0]) // visible.shape[2], int(size[1]) // visible.shape[3]
            if per_image is not None and fh % stride == 0 and fw % stride == 0:
                count = visible.shape[0] * per_image * (fh // stride) * (fw // stride)
                cache[key] = select_static(positions.reshape(-1), full.reshape(-1), count)
            else:
                cache[key] = positions[full]
        return cache[key]

    def sample_of_row(self, size: tuple[int, int]) -> torch.Tensor:
        """Batch index of each entry of ``rows(size)`` (for per-sample operations on rows)."""
        _, cache, _ = self._current()
        key = ("sample", int(size[0]), int(size[1]))
        if key not in cache:
            cache[key] = torch.div(self.rows(size), int(size[0]) * int(size[1]), rounding_mode="floor")
        return cache[key]

    def like(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Mask broadcastable to ``x`` ([B, C, H, W], or [B, H, W, C] when channels_last), same dtype."""
        if x.dim() != 4:
            raise RuntimeError(f"sparse layers expect 4-D feature maps, got shape {tuple(x.shape)}")
        if channels_last:
            return self.at(x.shape[1:3], x.dtype).permute(0, 2, 3, 1)
        return self.at(x.shape[2:4], x.dtype)


def masked_fill_pixels(images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Zero the masked patches of [B, C, H, W] images."""
    return images * upsample_mask(visible, images.shape[-2:]).to(images.dtype)
