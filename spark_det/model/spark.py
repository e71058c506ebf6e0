"""SparK: sparse, hierarchical masked image modeling for CNNs (Tian et al., ICLR 2023).

forward = random mask -> sparse encoder (4 scales) -> densify (sparse norm, mask token,
projection) -> light UNet decoder -> per-patch normalised MSE on the masked patches.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from ..sparse.blocks import densify_rows
from ..sparse.convert import sparsify
from ..sparse.masking import masked_fill_pixels, num_visible, random_visible_mask, upsample_mask
from .decoder import LightDecoder
from .encoder import SparseEncoder


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, h*w, patch*patch*C], patches in row-major grid order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid_hw: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = patches.shape[0]
    h, w = grid_hw
    x = patches.reshape(b, h, w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h * patch, w * patch)


def _uses_layer_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.LayerNorm) for m in module.modules())


class SparK(nn.Module):
    """SparK pretraining model around a :class:`SparseEncoder`.

    Args:
        encoder: the sparse encoder to pretrain.
        mask_ratio: fraction of patches masked (0.6 in the paper, 0.75 at 384 px).
        decoder_width: channels at the decoder's coarsest step, halved per step (768 in the paper).
        densify_norm: 'bn', 'ln' or 'auto' (LN for encoders that use LayerNorm, e.g. ConvNeXt).
        norm_pix_loss: normalise each target patch by its mean and std (the paper's loss).
    """

    def __init__(
        self,
        encoder: SparseEncoder,
        mask_ratio: float = 0.6,
        decoder_width: int = 768,
        densify_norm: str = "auto",
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.downsample_ratio
        self.decoder = LightDecoder(encoder.downsample_ratio, decoder_width)
        if densify_norm == "auto":
            densify_norm = "ln" if _uses_layer_norm(encoder) else "bn"
        if densify_norm not in ("bn", "ln"):
            raise ValueError(f"densify_norm must be 'bn', 'ln' or 'auto', got {densify_norm!r}")
        self.densify_norm = densify_norm

        enc_channels = encoder.channels[::-1]  # coarse -> fine, the decoder's order
        dec_channels = self.decoder.widths[: len(enc_channels)]
        self.mask_tokens = nn.ParameterList(
            nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, c, 1, 1), std=0.02, a=-0.02, b=0.02))
            for c in enc_channels
        )
        norm_cls = nn.BatchNorm2d if densify_norm == "bn" else (lambda c: LayerNorm2d(c, eps=1e-6))
        self.densify_norms = sparsify(
            nn.ModuleList(norm_cls(c) for c in enc_channels), encoder.active, impl=encoder.impl
        )
        self.densify_projs = nn.ModuleList(
            nn.Identity() if i == 0 and e == d else nn.Conv2d(e, d, kernel_size=1 if i == 0 else 3,
                                                               padding=0 if i == 0 else 1)
            for i, (e, d) in enumerate(zip(enc_channels, dec_channels))
        )

    def random_mask(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        grid = self.encoder.grid_size(images.shape[-2:])
        return random_visible_mask(images.shape[0], grid, self.mask_ratio, generator, images.device)

    def densify(self, features: list[torch.Tensor], visible: torch.Tensor) -> list[torch.Tensor]:
        """Coarse -> fine dense decoder inputs: sparse norm, mask token at masked positions, projection."""
        dense = []
        active = self.encoder.active
        with active.use(visible):
            for i, feat in enumerate(reversed(features)):
                if self.encoder.impl == "fast":  # the same values, without the norm keeping the whole map
                    feat = densify_rows(feat, self.densify_norms[i], self.mask_tokens[i], active.rows(feat.shape[-2:]))
                else:
                    feat = self.densify_norms[i](feat)
                    keep = upsample_mask(visible, feat.shape[-2:])
                    feat = torch.where(keep, feat, self.mask_tokens[i].to(feat.dtype))
                dense.append(self.densify_projs[i](feat))
        return dense

    def visible_per_image(self, images: torch.Tensor) -> int:
        """Patches every mask drawn by :meth:`random_mask` keeps per image (fixed by the mask ratio)."""
        return num_visible(self.encoder.grid_size(images.shape[-2:]), self.mask_ratio)

    def predict(self, images: torch.Tensor, visible: torch.Tensor, per_image: Optional[int] = None) -> torch.Tensor:
        """Decoder output [B, 3, H, W], in normalised-patch space when ``norm_pix_loss``.

        ``per_image``: the number of visible patches of every image of ``visible``, when known
        (see :class:`~spark_det.sparse.masking.ActiveMask`; torch.compile needs it)."""
        with self.encoder.active.use(visible, per_image):  # encoder and densify share the per-resolution masks
            return self.decoder(self.densify(self.encoder(images, visible), visible))

    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-patch targets [B, L, p*p*3] and the patch mean / std used to normalise them."""
        patches = patchify(images, self.patch_size)
        if not self.norm_pix_loss:
            return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (patches - mean) / std, mean, std

    def loss(self, images: torch.Tensor, prediction: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE; visible patches do not count."""
        target, _, _ = self.targets(images)
        per_patch = (patchify(prediction, self.patch_size) - target).square().mean(dim=-1)  # [B, L]
        masked = (~visible).flatten(1).to(per_patch.dtype)  # [B, L], 1 = masked
        return (per_patch * masked).sum() / masked.sum().clamp_min(1)

    def forward(
        self,
        images: torch.Tensor,
        visible: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        per_image: Optional[int] = None,
    ) -> torch.Tensor:
        """Pretraining loss for a batch of normalised images; the mask is drawn unless given.

        ``per_image``: visible patches per image of a given ``visible``, when the caller knows it
        (:meth:`visible_per_image` for masks drawn at this model's ratio); checked, and what lets
        torch.compile give every gather and scatter a static shape."""
        if visible is None:
            visible, per_image = self.random_mask(images, generator), self.visible_per_image(images)
        return self.loss(images, self.predict(images, visible, per_image), visible)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, visible: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Input, masked input and reconstruction in the input's pixel space (for visualisation).

        The reconstruction shows the prediction on masked patches (de-normalised with each
        patch's own statistics) and the original pixels on visible ones.
        """
        per_image = None
        if visible is None:
            visible, per_image = self.random_mask(images, generator), self.visible_per_image(images)
        grid = self.encoder.grid_size(images.shape[-2:])
        prediction = patchify(self.predict(images, visible, per_image), self.patch_size)
        _, mean, std = self.targets(images)
        predicted = unpatchify(prediction * std + mean, self.patch_size, grid, images.shape[1])
        keep = upsample_mask(visible, images.shape[-2:])
        return {
            "input": images,
            "masked": masked_fill_pixels(images, visible),
            "reconstruction": torch.where(keep, images, predicted),
            "visible": visible,
        }
