"""Reconstruction grids: rows of (original, masked, reconstruction) images."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Union

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.utils import save_image

from ..data.constants import IMAGENET_MEAN, IMAGENET_STD
from ..data.decode import read_images
from ..data.folder import find_images
from ..errors import CheckpointError, DataError, DataWarning, first_line
from ..io import PathLike, load_file, write_atomic
from ..model.registry import create_spark
from ..model.spark import SparK


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
    return write_atomic(path, lambda f: save_image(rows.flatten(0, 1), f, format="png", nrow=3, padding=2,
                                                   pad_value=1.0))


def reconstruction_grid_from_checkpoint(checkpoint: PathLike, images: PathLike, output: PathLike,
                                        num_images: int = 8, seed: int = 0) -> tuple[Path, int, dict[str, Any]]:
    """The grid for the first ``num_images`` of ``images`` (folder or path list), resized to the
    run's input size, from a full checkpoint written by pretraining; returns (path, count, config).
    Unreadable image files are skipped with a warning."""
    ckpt = load_file(checkpoint)
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{checkpoint} is not a full spark-det checkpoint (needs 'model' and 'config'); "
                              "an exported encoder has no decoder to reconstruct with")
    found, unreadable = read_images(find_images(images), num_images)
    for path, reason in unreadable:
        warnings.warn(f"skipping unreadable image {path}: {reason}", DataWarning, stacklevel=2)
    if not found:
        raise DataError(f"none of the images in {images} can be read (e.g. {unreadable[0][0]}: {unreadable[0][1]})")
    cfg = ckpt["config"]
    model = create_spark(cfg["model"], mask_ratio=cfg["mask_ratio"], decoder_width=cfg["decoder_width"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: its weights do not fit the {cfg['model']} its config names "
                              f"({first_line(exc)})") from exc
    to_tensor = transforms.Compose([
        transforms.Resize(tuple(cfg["input_size"]), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    batch = torch.stack([to_tensor(image) for _, image in found])
    return save_reconstruction_grid(model, batch, output, seed=seed), len(found), cfg
