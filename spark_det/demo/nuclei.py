"""A small real instance-segmentation set: the fluorescence nuclei image that ships inside the ``stardist``
wheel on PyPI (``stardist/data/images/img2d.tif``, 512 x 512 uint16, with ``mask2d.tif``, its instance label
image of about 125 nuclei), tiled into COCO-format crops for ``spark-det study``.

Train and val crops come from disjoint vertical bands of the image (left 5/8 and right 3/8), so no val pixel
is trained on, apart from nuclei the band border cuts; unlabeled crops for SparK come from the train band
only. Only the two TIFFs are read from the wheel (a zip): stardist and TensorFlow are not installed.
``spark-det make-data --stardist-nuclei`` writes it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputFileError

WHEEL_IMAGE = "stardist/data/images/img2d.tif"
WHEEL_MASK = "stardist/data/images/mask2d.tif"
STARDIST_VERSION = "0.9.2"


def download_wheel(folder: Path) -> Path:
    """``pip download --no-deps stardist==0.9.2`` into ``folder`` (no install, no dependencies)."""
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                        "-d", str(folder), f"stardist=={STARDIST_VERSION}"], check=True)
    except subprocess.CalledProcessError as exc:
        raise InputFileError(f"pip could not download stardist=={STARDIST_VERSION} (exit {exc.returncode}): "
                             "download the wheel elsewhere and pass it, --stardist-nuclei WHEEL") from exc
    return next(folder.glob("stardist-*.whl"))


def read_wheel(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """The nuclei image and its instance labels (uint16 TIFFs; Pillow reads them as mode I;16)."""
    from PIL import Image

    try:
        with zipfile.ZipFile(wheel) as z:
            image, labels = (np.array(Image.open(io.BytesIO(z.read(name)))) for name in (WHEEL_IMAGE, WHEEL_MASK))
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise InputFileError(f"{wheel} is not a stardist wheel with {WHEEL_IMAGE}: {exc}") from exc
    return image, labels


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Contrast-stretch a fluorescence image to 8 bits (1st-99.8th percentile, as stardist's examples normalise)."""
    low, high = np.percentile(image, (1, 99.8))
    return (np.clip((image.astype(np.float64) - low) / max(high - low, 1e-6), 0, 1) * 255).round().astype(np.uint8)


def coco_annotations(labels: np.ndarray, image_id: int, first_id: int, min_area: int) -> list[dict]:
    """One annotation per instance label in a crop (RLE mask, box and area from pycocotools)."""
    from pycocotools import mask as mask_utils

    out = []
    for value in np.unique(labels):
        if value == 0:
            continue
        rle = mask_utils.encode(np.asfortranarray(labels == value, dtype=np.uint8))
        area = int(mask_utils.area(rle))
        if area < min_area:  # slivers of nuclei the crop border cuts
            continue
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"id": first_id + len(out), "image_id": image_id, "category_id": 1, "segmentation": rle,
                    "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    return out


def write_split(root: Path, name: str, image: np.ndarray, labels: np.ndarray, corners: list[tuple[int, int]],
                crop: int, min_area: int) -> Path:
    """Crops at ``corners`` (x, y) as PNGs under root/images and their COCO JSON root/<name>.json."""
    from PIL import Image

    images, annotations = [], []
    for i, (x, y) in enumerate(corners):
        file_name = f"{name}_{i:03d}.png"
        Image.fromarray(image[y:y + crop, x:x + crop]).save(root / "images" / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": crop, "height": crop})
        annotations += coco_annotations(labels[y:y + crop, x:x + crop], i + 1, len(annotations) + 1, min_area)
    path = root / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "nucleus"}]}))
    return path


def make_nuclei_dataset(root: str | Path, wheel: Optional[Path] = None, crop: int = 128, stride: int = 64,
                        num_unlabeled: int = 200, min_area: int = 16, seed: int = 0) -> dict[str, Path]:
    """Write train.json / val.json / images/ / unlabeled/ under ``root``; returns their paths."""
    from PIL import Image

    root = Path(root)
    if wheel is None:
        with tempfile.TemporaryDirectory() as tmp:
            image, labels = read_wheel(download_wheel(Path(tmp)))
    else:
        image, labels = read_wheel(Path(wheel))
    image = to_uint8(image)
    height, width = image.shape
    split = width * 5 // 8  # train band x < split, val band x >= split
    ys = range(0, height - crop + 1, stride)
    train = [(x, y) for y in ys for x in range(0, split - crop + 1, stride)]
    val = [(x, y) for y in ys for x in range(split, width - crop + 1, stride)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    paths = {"root": root, "images": root / "images",
             "train_json": write_split(root, "train", image, labels, train, crop, min_area),
             "val_json": write_split(root, "val", image, labels, val, crop, min_area),
             "unlabeled": root / "unlabeled"}
    rng = np.random.default_rng(seed)
    for i in range(num_unlabeled):  # random crops of the train band, in the 8 orientations
        x, y = int(rng.integers(0, split - crop + 1)), int(rng.integers(0, height - crop + 1))
        tile = np.rot90(image[y:y + crop, x:x + crop], k=int(rng.integers(4)))
        Image.fromarray(np.ascontiguousarray(tile[:, ::-1] if rng.integers(2) else tile)).save(
            root / "unlabeled" / f"{i:04d}.png")
    return paths
