"""SparseEncoder: any timm CNN with a 4-scale pyramid, executed sparsely under a patch mask."""

from __future__ import annotations

import copy
from typing import Callable, Optional, TypeVar, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropBlock2d, DropPath

from ..sparse.convert import first_layer_fed_masked_values, naming_the_failing_layer, probe_modules, sparsify
from ..sparse.masking import ActiveMask, masked_fill_pixels, upsample_mask

T = TypeVar("T")

NUM_SCALES = 4
STOCHASTIC_LAYERS = (nn.modules.dropout._DropoutNd, DropPath, DropBlock2d)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _randomise_norm(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics (for the probe copy only)."""
    if not isinstance(module, NORMS):
        return
    for name, low, high in (("weight", 0.5, 1.5), ("bias", -1.0, 1.0), ("running_mean", -1.0, 1.0),
                            ("running_var", 0.5, 2.0)):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * (high - low) + low)


def module_outputs(model: nn.Module, run: Callable[[], T]) -> tuple[T, dict[str, torch.Tensor]]:
    """``run()``'s result and the first tensor output of every module of ``model``, in run order."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str, output: object) -> None:  # returns None: a hook's value would replace the output
        if isinstance(output, torch.Tensor) and name not in outputs:
            outputs[name] = output

    handles = [m.register_forward_hook(lambda _m, _i, o, name=name: keep(name, o)) for name, m in model.named_modules()]
    try:
        return run(), outputs
    finally:
        for h in handles:
            h.remove()


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
    return bool((a - b).abs().max() <= 1e-3 * max(1.0, a.abs().max().item()))


class SparseEncoder(nn.Module):
    """A timm model whose forward takes the visible-patch mask and returns 4 feature maps.

    The wrapped model keeps timm's parameter names, so :meth:`dense_state_dict` loads back into
    ``timm.create_model(name, num_classes=0)`` unchanged. Scales, channels and the downsample
    ratio (the mask patch size) come from the model's own ``feature_info``.

    Args:
        model: a timm model name or an already built timm model (with ``forward_intermediates``).
        verify: run a small probe after conversion and raise if a layer feeds non-zero values to
            masked positions (i.e. the model contains a layer sparse execution does not cover).
        impl: 'fast' (default: standard blocks on visible rows, channels_last memory format) or
            'reference' (SparK's dense emulation with gather/scatter norms); same outputs.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``, ``norm_layer``).
    """

    def __init__(self, model: Union[str, nn.Module], verify: bool = True, impl: str = "fast", **timm_kwargs) -> None:
        super().__init__()
        self.impl = impl
        if isinstance(model, str):
            self.model_name = model
            model = timm.create_model(model, pretrained=False, num_classes=0, global_pool="", **timm_kwargs)
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
        with torch.no_grad():
            record = probe_modules(model, lambda: self.model.forward_intermediates(probe, indices=NUM_SCALES))
            sparsify(model, self.active, impl=impl, probe=record)
        model.train(was_training)
        if verify:
            with naming_the_failing_layer(self.model):
                self.verify()

    @torch.no_grad()
    def verify(self) -> None:
        """Raise ValueError if any layer on the forward path is not sparse-aware.

        Runs on a throw-away float64 copy in train mode, with random affine parameters and running
        statistics in every norm (fresh weights would let a dense BatchNorm map zeros to zeros),
        and checks two properties of sparse execution:

        1. every sparse layer receives exactly 0 at masked positions, and so do the outputs;
        2. extra masked patches change no feature: the image padded on the right with one and with
           two images' width of masked patches gives the same features on their common part. A
           dense norm or a pooled statistic (global pooling, squeeze-excitation) would count them.
        """
        probe = copy.deepcopy(self).double().train()
        generator = torch.Generator().manual_seed(0)
        for module in probe.modules():
            if isinstance(module, STOCHASTIC_LAYERS):
                module.eval()  # the same draws in every pass
            _randomise_norm(module, generator)
        r = self.downsample_ratio
        images = torch.randn(2, 3, 2 * r, 2 * r, generator=generator, dtype=torch.float64)
        visible = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool).view(2, 1, 2, 2)
        offender = first_layer_fed_masked_values(probe.model, lambda: probe(images, visible))
        if offender is not None:
            raise ValueError(
                f"{self.model_name}: layer '{offender}' receives non-zero values at masked positions; "
                "a layer before it is not sparse-aware, so masked positions would not be empty"
            )

        def padded(times: int) -> list[torch.Tensor]:
            return probe(F.pad(images, (0, times * 2 * r)), F.pad(visible, (0, times * 2)))

        (once, outputs_once), (twice, outputs_twice) = (module_outputs(probe.model, lambda t=t: padded(t))
                                                        for t in (1, 2))
        for level, (a, b) in enumerate(zip(once, twice)):
            if not same_on_common_part(a, b):
                culprit = next((name for name, out in outputs_once.items()
                                if name in outputs_twice and not same_on_common_part(out, outputs_twice[name])), None)
                where = f"layer '{culprit}' ({type(dict(probe.model.named_modules())[culprit]).__qualname__})" \
                    if culprit is not None else "a layer"
                raise ValueError(
                    f"{self.model_name}: features at scale {level} change when masked patches are added: {where} "
                    "counts masked positions in a statistic or pooled value (it has no sparse version)"
                )
            masked = ~upsample_mask(F.pad(visible, (0, 2)), a.shape[-2:])
            if a.masked_select(masked).abs().max() > 0:
                raise ValueError(f"{self.model_name}: features at scale {level} are not empty at masked positions")

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
        if visible is None:
            visible = torch.ones(images.shape[0], 1, *grid, dtype=torch.bool, device=images.device)
        elif tuple(visible.shape[-2:]) != grid:
            raise ValueError(f"mask grid {tuple(visible.shape[-2:])} does not match the input's grid {grid}")
        with self.active.use(visible):
            images = masked_fill_pixels(images, visible)
            if self.impl == "fast":  # rows are then gathered from views, without a transpose copy
                images = images.contiguous(memory_format=torch.channels_last)
            return self.model.forward_intermediates(images, indices=NUM_SCALES, intermediates_only=True)

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the plain timm model (loads into ``timm.create_model(name, num_classes=0)``)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
