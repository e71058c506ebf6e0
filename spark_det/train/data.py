"""Unlabeled image data for pretraining: folders, ImageNet layouts or path lists, read robustly.

Reproducibility: each sample's augmentation is drawn from a seed derived from (seed, epoch,
index), and the sampler (:mod:`.sampler`) hands (epoch, index) pairs to the dataset. So the data
stream depends only on the run's seed, not on workers or process state, and a resumed run sees
exactly the images and crops the uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ..errors import DataError
from ..model.spark import IMAGENET_MEAN, IMAGENET_STD
from .sampler import sample_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def find_images(source: Union[str, Path]) -> list[Path]:
    """All image files under a folder (recursively, so ImageNet's train/<class>/ works too), or
    the paths listed in a text file (one per line, relative to the file's folder; # comments)."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"data path {source} does not exist")
    if source.is_file():
        base = source.parent
        lines = [ln.strip() for ln in source.read_text().splitlines()]
        listed = [ln for ln in lines if ln and not ln.startswith("#")]
        paths = [(base / ln) if not Path(ln).is_absolute() else Path(ln) for ln in listed]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} paths listed in {source} do not exist, e.g. {missing[0]}")
    else:
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(
            f"no images found in {source} (looked for {', '.join(IMAGE_EXTENSIONS)} recursively, "
            "or a text file listing image paths)"
        )
    return paths


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """Open any common image as 8-bit RGB: grayscale, palette, RGBA, CMYK and 16-bit included."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            if img.mode == "F":
                peak = max(float(arr.max()), 1e-12)
            img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
        elif img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")


def pretrain_transform(input_size: Sequence[int], scale: tuple[float, float] = (0.67, 1.0)) -> transforms.Compose:
    """The paper's augmentation: RandomResizedCrop (bicubic), horizontal flip, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(tuple(input_size), scale=scale, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class UnlabeledImages(Dataset):
    """Images for pretraining. Items are keyed by (epoch, index); see the module docstring.

    A file that cannot be read (corrupt, truncated, not an image) is skipped with a warning and
    replaced by the next readable one, so batches keep their size; ``item["skipped"]`` counts the
    skips so the training loop can report them.
    """

    def __init__(self, source: Union[str, Path, Sequence[Path]], input_size: Sequence[int],
                 seed: int = 0, scale: tuple[float, float] = (0.67, 1.0)) -> None:
        self.paths = list(source) if isinstance(source, (list, tuple)) else find_images(source)
        if not self.paths:
            raise DataError("no images given")
        self.transform = pretrain_transform(input_size, scale)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        attempts = min(len(self.paths), 100)
        for skipped in range(attempts):
            path = self.paths[(index + skipped) % len(self.paths)]
            try:
                image = load_rgb(path)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=2)
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                tensor = self.transform(image)
            return {"image": tensor, "skipped": skipped, "key": (epoch, index)}
        raise DataError(f"{attempts} consecutive unreadable images from {self.paths[index]}: is the data corrupt?")


def collate(items: list[dict]) -> dict:
    """Stack a batch's images; sum its skipped-file counts; keep its (epoch, index) keys."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "skipped": sum(it["skipped"] for it in items),
        "key": [it["key"] for it in items],
    }
