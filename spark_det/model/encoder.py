"""SparseEncoder: any timm CNN with a 4-scale pyramid, executed sparsely under a patch mask."""

from __future__ import annotations

from typing import Optional, Union

import timm
import torch
import torch.nn as nn

from ..sparse.convert import naming_the_failing_layer, probe_modules, sparsify
from ..sparse.masking import ActiveMask, masked_fill_pixels
from .leak_probe import find_leak

NUM_SCALES = 4


class SparseEncoder(nn.Module):
    """A timm model whose forward takes the visible-patch mask and returns 4 feature maps.

    The wrapped model keeps timm's parameter names, so :meth:`dense_state_dict` loads back into
    ``timm.create_model(name, num_classes=0)`` unchanged. Scales, channels and the downsample
    ratio (the mask patch size) come from the model's own ``feature_info``.

    Args:
        model: a timm model name or an already built timm model (with ``forward_intermediates``).
        verify: run the leak probe after conversion, with every weight randomised, and raise
            ValueError naming the layer if a visible feature depends on masked patches.
        impl: 'fast' (default: standard blocks on visible rows, channels_last memory format) or
            'reference' (SparK's dense emulation with gather/scatter norms); same outputs.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``, ``norm_layer``).
    """

    def __init__(self, model: Union[str, nn.Module], verify: bool = True, impl: str = "fast", **timm_kwargs) -> None:
        super().__init__()
        self.impl = impl
        if isinstance(model, str):
            self.model_name = model
            try:
                model = timm.create_model(model, pretrained=False, num_classes=0, global_pool="", **timm_kwargs)
            except AssertionError as exc:  # a timm constructor that asserts on its arguments
                raise ValueError(f"{model}: timm cannot build it with {timm_kwargs}: "
                                 f"{str(exc) or 'an assertion in its constructor failed'}") from exc
        else:
            self.model_name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
            raise TypeError(f"{self.model_name}: SparseEncoder needs a timm model with forward_intermediates")
        info = model.feature_info[-NUM_SCALES:]
        self.channels: list[int] = [int(i["num_chs"]) for i in info]  # fine -> coarse
        self.reductions: list[int] = [int(i["reduction"]) for i in info]
        if len(info) < NUM_SCALES or any(b != 2 * a for a, b in zip(self.reductions, self.reductions[1:])):
            raise ValueError(
                f"{self.model_name}: SparK needs 4 feature scales each 2x coarser than the last, "
                f"feature_info gives reductions {self.reductions}"
            )
        self.downsample_ratio: int = self.reductions[-1]
        self.model = model
        self.active = ActiveMask()
        probe = torch.randn(2, 3, 2 * self.downsample_ratio, 2 * self.downsample_ratio)
        was_training = model.training
        model.eval()
        with torch.no_grad(), naming_the_failing_layer(model):  # a block that asserts on shapes is named
            record = probe_modules(model, lambda: self.model.forward_intermediates(probe, indices=NUM_SCALES),
                                   audit_input=probe, impl=impl)
            sparsify(model, self.active, impl=impl, probe=record)
        model.train(was_training)
        if verify:
            with naming_the_failing_layer(self.model):
                self.verify()

    def verify(self) -> None:
        """Raise ValueError if any visible feature depends on masked patches, with every weight
        randomised as training would leave it (:func:`.leak_probe.find_leak`); the message names
        the layer whose own code counts masked positions."""
        finding = find_leak(self, randomise=True)
        if finding is not None:
            raise ValueError(finding)

    def audit(self) -> Optional[str]:
        """The leak probe on the weights as they are (a loaded checkpoint, a run in progress):
        None when leak-free, else the one-line finding. Runs on a float64 copy; the encoder is untouched."""
        return find_leak(self, randomise=False)

    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Mask grid for an input size; both sides must be multiples of the downsample ratio."""
        h, w = image_hw
        r = self.downsample_ratio
        if h % r or w % r:
            raise ValueError(f"input size {h}x{w} must be a multiple of {r} for {self.model_name}")
        return h // r, w // r

    def forward(self, images: torch.Tensor, visible: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Features [B, C_i, H/r_i, W/r_i] fine -> coarse, exactly zero at masked positions.

        ``visible``: bool [B, 1, h, w] on the coarsest grid; None means every patch is visible
        (plain dense inference).
        """
        grid = self.grid_size(images.shape[-2:])
        per_image = None
        if visible is None:
            visible = torch.ones(images.shape[0], 1, *grid, dtype=torch.bool, device=images.device)
            per_image = grid[0] * grid[1]
        elif tuple(visible.shape[-2:]) != grid:
            raise ValueError(f"mask grid {tuple(visible.shape[-2:])} does not match the input's grid {grid}")
        with self.active.use(visible, per_image):  # inside SparK.predict: its context's count
            images = masked_fill_pixels(images, visible)
            if self.impl == "fast":  # rows are then gathered from views, without a transpose copy
                images = images.contiguous(memory_format=torch.channels_last)
            return self.model.forward_intermediates(images, indices=NUM_SCALES, intermediates_only=True)

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the plain timm model (loads into ``timm.create_model(name, num_classes=0)``)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
