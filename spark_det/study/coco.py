"""The user's labeled data: COCO-format JSON files checked before any training starts.

A study runs for hours; a JSON that does not parse, has no categories or annotations, or names images
that are not there must stop it at once with one line, not after the pretraining.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, InputFileError
from ..io import file_sha256


@dataclass(frozen=True)
class CocoSplit:
    """What the study needs to know about one COCO-format split."""

    json: Path
    images: Path
    num_images: int
    num_annotations: int
    categories: tuple[tuple[int, str], ...]  # (id, name), sorted by id
    has_masks: bool
    median_short_side: int
    digest: str  # sha256 of the JSON file: a finished run is only reused on the same data


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except OSError as exc:
        raise InputFileError(f"image {path} cannot be read: {exc}") from exc


def check_coco(json_path: str | Path, image_dir: str | Path, role: str) -> CocoSplit:
    """Parse and check one split (``role``: 'train' or 'val' in messages); raises one-line errors."""
    path, images = Path(json_path).expanduser(), Path(image_dir).expanduser()
    if not path.is_file():
        raise InputFileError(f"{role} JSON {path} does not exist")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{role} JSON {path} does not parse: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise InputFileError(f"{role} JSON {path} is not COCO format: it needs 'images', 'annotations' and "
                             "'categories' lists")
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise DataError(f"{role} JSON {path} has no categories: list the classes under 'categories'")
    if not data["images"]:
        raise DataError(f"{role} JSON {path} lists no images")
    if not data["annotations"]:
        raise DataError(f"{role} JSON {path} has no annotations: a detector needs labeled objects")
    if not images.is_dir():
        raise DataError(f"{role} image folder {images} does not exist")
    try:
        cats = tuple(sorted((int(c["id"]), str(c["name"])) for c in categories))
        missing = [img["file_name"] for img in data["images"] if not (images / img["file_name"]).is_file()]
        ids = {c for c, _ in cats}
        unknown = {a["category_id"] for a in data["annotations"]} - ids
    except (KeyError, TypeError, ValueError) as exc:
        raise InputFileError(f"{role} JSON {path} is not COCO format: an entry lacks {exc}") from exc
    if missing:
        raise DataError(f"{role}: {len(missing)} of the {len(data['images'])} images that {path} lists are not in "
                        f"{images}, e.g. {missing[0]}")
    if unknown:
        raise DataError(f"{role} JSON {path}: annotations use category ids {sorted(unknown)[:5]} that 'categories' "
                        "does not define")
    with_masks = sum(bool(a.get("segmentation")) for a in data["annotations"])
    if 0 < with_masks < len(data["annotations"]):
        raise DataError(f"{role} JSON {path}: {with_masks} of {len(data['annotations'])} annotations have a "
                        "segmentation; give every object a mask (Mask R-CNN) or none (Faster R-CNN)")
    sides = [min(img["width"], img["height"]) if img.get("width") and img.get("height")
             else min(_image_size(images / img["file_name"])) for img in data["images"][:1000]]
    return CocoSplit(path.resolve(), images.resolve(), len(data["images"]), len(data["annotations"]), cats,
                     with_masks > 0, int(statistics.median(sides)), file_sha256(path))


def check_splits(train: CocoSplit, val: CocoSplit) -> None:
    """Train and val must describe the same classes, and both have masks or neither."""
    if train.categories != val.categories:
        raise DataError(f"train and val JSON define different categories: {list(train.categories)} against "
                        f"{list(val.categories)}")
    if train.has_masks != val.has_masks:
        which = "train" if train.has_masks else "val"
        raise DataError(f"only the {which} JSON has masks: give both splits masks (Mask R-CNN) or neither "
                        "(Faster R-CNN)")
