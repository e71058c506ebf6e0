"""Reconstruction grids: rows of (original, masked, reconstruction) images."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torchvision.utils import save_image

from .spark import IMAGENET_MEAN, IMAGENET_STD, SparK


def denormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


@torch.no_grad()
def save_reconstruction_grid(model: SparK, images: torch.Tensor, path: Union[str, Path], seed: int = 0) -> Path:
    """Each row: original | masked input | reconstruction (prediction on masked patches)."""
    was_training = model.training
    model.eval()
    out = model.reconstruct(images, generator=torch.Generator().manual_seed(seed))
    model.train(was_training)
    rows = torch.stack([denormalize(out[k].float().cpu()) for k in ("input", "masked", "reconstruction")], dim=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.flatten(0, 1), path, nrow=3, padding=2, pad_value=1.0)
    return path
