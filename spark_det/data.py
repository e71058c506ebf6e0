"""Unlabeled image data for pretraining: folders, ImageNet layouts or path lists, read robustly.

Reproducibility: each sample's augmentation is drawn from a seed derived from (seed, epoch,
index), and the sampler hands (epoch, index) pairs to the dataset. So the data stream depends
only on the run's seed, not on workers or process state, and a resumed run sees exactly the
images and crops the uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .spark import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class NoImagesError(ValueError):
    """The data source holds no usable image paths."""


def find_images(source: Union[str, Path]) -> list[Path]:
    """All image files under a folder (recursively, so ImageNet's train/<class>/ works too), or
    the paths listed in a text file (one per line, relative to the file's folder; # comments)."""
    source = Path(source).expanduser()
    if not source.exists():
        raise NoImagesError(f"data path {source} does not exist")
    if source.is_file():
        base = source.parent
        lines = [ln.strip() for ln in source.read_text().splitlines()]
        paths = [(base / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines if ln and not ln.startswith("#")]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise NoImagesError(f"{len(missing)} paths listed in {source} do not exist, e.g. {missing[0]}")
    else:
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise NoImagesError(
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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]) >> 1


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
            raise NoImagesError("no images given")
        self.transform = pretrain_transform(input_size, scale)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for skipped in range(min(len(self.paths), 100)):
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
        raise RuntimeError(f"100 consecutive unreadable images from {self.paths[index]}: is the data corrupt?")


class EpochSampler(Sampler):
    """Shuffled, rank-sharded (epoch, index) keys; the order depends only on (seed, epoch).

    Like DistributedSampler, but it can start mid-epoch (``start_batch``), which is what makes
    resuming restore the data order, and it yields the epoch along with each index.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        # Each rank gets the same number of full batches per epoch (drop_last semantics).
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise NoImagesError(
                f"{num_samples} images are fewer than one global batch ({batch_size} x {world_size} ranks)"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.batches_per_epoch * self.batch_size
        mine = order[self.rank : self.rank + per_rank * self.world_size : self.world_size]
        for index in mine[self.start_batch * self.batch_size :]:
            yield (self.epoch, index)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "skipped": sum(it["skipped"] for it in items),
        "key": [it["key"] for it in items],
    }
