"""Image files as 8-bit RGB, and what counts as an unreadable one: shared by every data source
(a file of a folder or a member of a shard), the visualisation and shard packing."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


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
