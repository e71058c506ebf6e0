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


UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError)  # what PIL raises for bad files


def read_images(paths: Sequence[Path], count: int) -> tuple[list[tuple[Path, Image.Image]], list[tuple[Path, str]]]:
    """The first ``count`` readable images of ``paths`` (as RGB), and (path, reason) for each
    unreadable one met on the way."""
    good, bad = [], []
    for path in paths:
        if len(good) == count:
            break
        try:
            good.append((path, load_rgb(path)))
        except UNREADABLE as exc:
            bad.append((path, str(exc) or type(exc).__name__))
    return good, bad


def require_readable(paths: Sequence[Path], source: object, sample: int = 16) -> None:
    """Fail fast, before a run writes anything, when none of ``sample`` images spread over the
    data set can be read (a folder of corrupt files, or files that are not images)."""
    step = max(len(paths) / sample, 1.0)
    picks = sorted({int(i * step) for i in range(min(sample, len(paths)))})
    good, bad = read_images([paths[i] for i in picks], 1)
    if not good:
        path, reason = bad[0]
        raise DataError(f"none of the {len(picks)} images sampled from {source} can be read (e.g. {path}: "
                        f"{reason}); is the data corrupt, or not images?")


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
    replaced by the next readable one, so batches keep their size; ``item["skipped"]`` lists the
    skipped files' indices so the training loop can count distinct unreadable files.
    """

    def __init__(self, source: Union[str, Path, Sequence[Path]], input_size: Sequence[int],
                 seed: int = 0, scale: tuple[float, float] = (0.67, 1.0)) -> None:
        self.paths = list(source) if isinstance(source, (list, tuple)) else find_images(source)
        if not self.paths:
            raise DataError("no images given")
        self.source = source if not isinstance(source, (list, tuple)) else "the given paths"
        self.transform = pretrain_transform(input_size, scale)
        self.seed = seed

    def require_readable(self, sample: int = 16) -> None:
        require_readable(self.paths, self.source, sample)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        attempts = min(len(self.paths), 100)
        skipped: list[int] = []
        for offset in range(attempts):
            position = (index + offset) % len(self.paths)
            try:
                image = load_rgb(self.paths[position])
            except UNREADABLE as exc:
                warnings.warn(f"skipping unreadable image {self.paths[position]}: {exc}", stacklevel=2)
                skipped.append(position)
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                tensor = self.transform(image)
            return {"image": tensor, "skipped": skipped, "key": (epoch, index)}
        raise DataError(f"{attempts} consecutive images from {self.paths[index]} on cannot be read: is the data "
                        "corrupt?")


def collate(items: list[dict]) -> dict:
    """Stack a batch's images; gather the indices of the files it skipped; keep its (epoch, index) keys."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "skipped": [index for it in items for index in it["skipped"]],
        "key": [it["key"] for it in items],
    }
