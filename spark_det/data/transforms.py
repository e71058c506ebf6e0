"""The pretraining augmentation, shared by every data source (folders, path lists, shards)."""

from __future__ import annotations

from typing import Sequence

from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .constants import IMAGENET_MEAN, IMAGENET_STD


def pretrain_transform(input_size: Sequence[int], scale: tuple[float, float] = (0.67, 1.0)) -> transforms.Compose:
    """The paper's augmentation: RandomResizedCrop (bicubic), horizontal flip, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(tuple(input_size), scale=scale, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
