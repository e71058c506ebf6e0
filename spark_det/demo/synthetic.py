"""A deterministic synthetic instance-segmentation dataset in COCO format, plus unlabeled images.

Built-in data for the demo and the tests: no download, any size, reproducible from a seed.
Scenes hold several shapes (classes) with random texture, colour, scale, rotation and mutual
occlusion on cluttered gradient backgrounds. Masks are the *visible* part of each object (stored
as COCO RLE, since occlusion can leave holes a polygon cannot describe) and boxes are the masks'
tight boxes. Each image is drawn from its own generator seeded by (seed, split, index), so a
dataset is the same whatever order or subset is generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

CLASSES = ("circle", "rectangle", "triangle", "star", "cross", "ring")
_SPLIT_IDS = {"train": 0, "val": 1, "unlabeled": 2}


@dataclass
class SceneConfig:
    image_size: tuple[int, int] = (128, 128)  # (height, width)
    min_objects: int = 1
    max_objects: int = 5
    min_scale: float = 0.12  # object size as a fraction of the shorter image side
    max_scale: float = 0.45
    min_visible_fraction: float = 0.35  # objects hidden more than this by others are dropped
    min_area: int = 24  # pixels
    disc_clutter: bool = True  # soft discs in the background clutter (they look like the "circle" class)
    # One "object" class for every shape: instance segmentation of whatever is there (cells, buildings,
    # defects). Same images; only the labels change.
    single_class: bool = False


OBJECT_CLASS = "object"


def class_names(cfg: SceneConfig) -> tuple[str, ...]:
    """The categories a data set made with ``cfg`` is labelled with, in category-id order."""
    return (OBJECT_CLASS,) if cfg.single_class else CLASSES


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, size: float,
                angle: float, rng: np.random.Generator) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s  # rotated coordinates
    v = -(xx - cx) * s + (yy - cy) * c
    r = size / 2
    if kind == "circle":
        aspect = rng.uniform(0.7, 1.0)
        return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1
    if kind == "rectangle":
        aspect = rng.uniform(0.4, 1.0)
        return (np.abs(u) <= r) & (np.abs(v) <= r * aspect)
    if kind == "triangle":
        # equilateral triangle: three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= r * 0.5
        return inside
    if kind == "star":
        theta = np.arctan2(v, u)
        radius = np.hypot(u, v)
        points = 5
        edge = r * (0.55 + 0.45 * np.abs(np.cos(points * theta / 2)) ** 3)
        return radius <= edge
    if kind == "cross":
        arm = r * rng.uniform(0.25, 0.4)
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    if kind == "ring":
        radius = np.hypot(u, v)
        return (radius <= r) & (radius >= r * rng.uniform(0.45, 0.65))
    raise ValueError(f"unknown shape {kind!r}")


def _texture(h: int, w: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    base = rng.uniform(0, 255, size=3)
    other = np.clip(base + rng.uniform(-110, 110, size=3), 0, 255)
    kind = rng.integers(4)
    if kind == 0:  # solid
        weight = np.zeros((h, w))
    elif kind == 1:  # stripes
        a = rng.uniform(0, np.pi)
        period = rng.uniform(4, 12)
        weight = (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0).astype(float)
    elif kind == 2:  # checker
        cell = rng.integers(3, 9)
        weight = ((yy // cell + xx // cell) % 2).astype(float)
    else:  # speckle
        weight = rng.uniform(0, 1, size=(h, w))
    return base[None, None] * (1 - weight[..., None]) + other[None, None] * weight[..., None]


def _background(h: int, w: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                discs: bool = True) -> np.ndarray:
    a, b = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    t = ((xx * np.cos(angle) + yy * np.sin(angle)) / max(h, w) + 1) / 2
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    # clutter: a few thin lines and soft blobs that are not objects
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        if rng.random() < 0.5 or not discs:
            th = rng.uniform(0, np.pi)
            dist = np.abs((xx - cx) * np.sin(th) - (yy - cy) * np.cos(th))
            sel = dist < rng.uniform(0.5, 1.5)
        else:
            sel = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(4, 0.02 * h * w)
        img[sel] = img[sel] * 0.5 + rng.uniform(0, 255, size=3) * 0.5
    img += rng.normal(0, 6, size=img.shape)
    return img


def render_scene(rng: np.random.Generator, cfg: SceneConfig) -> tuple[np.ndarray, list[dict]]:
    """One RGB uint8 image and its objects: dicts with 'category' (index) and 'mask' (bool)."""
    h, w = cfg.image_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = _background(h, w, rng, yy, xx, cfg.disc_clutter)
    objects = []
    for _ in range(rng.integers(cfg.min_objects, cfg.max_objects + 1)):
        cls = int(rng.integers(len(CLASSES)))
        size = rng.uniform(cfg.min_scale, cfg.max_scale) * min(h, w)
        cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
        full = _shape_mask(CLASSES[cls], yy, xx, cy, cx, size, rng.uniform(0, 2 * np.pi), rng)
        if full.sum() < cfg.min_area:
            continue
        img[full] = _texture(h, w, rng, yy, xx)[full]
        for earlier in objects:  # the new object occludes everything drawn before it
            earlier["mask"] &= ~full
        objects.append({"category": cls, "mask": full.copy(), "full_area": int(full.sum())})
    kept = [
        o for o in objects
        if o["mask"].sum() >= max(cfg.min_area, cfg.min_visible_fraction * o["full_area"])
    ]
    return np.clip(img, 0, 255).astype(np.uint8), kept


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def coco_annotation(mask: np.ndarray, category: int, image_id: int, ann_id: int) -> dict:
    from pycocotools import mask as mask_utils  # the demo extra: unlabeled images need no annotations

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    x, y, bw, bh = mask_utils.toBbox(rle).tolist()
    return {
        "id": ann_id, "image_id": image_id, "category_id": category + 1, "iscrowd": 0,
        "segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": [x, y, bw, bh],
    }


def write_coco_split(root: Path, split: str, num_images: int, seed: int, cfg: SceneConfig) -> Path:
    """Render ``num_images`` scenes to ``root/split/*.png`` and ``root/annotations/instances_split.json``."""
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = render_scene(_image_rng(seed, split, index), cfg)
        name = f"{index:06d}.png"
        Image.fromarray(image).save(image_dir / name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "height": cfg.image_size[0], "width": cfg.image_size[1]})
        for obj in objects:
            category = 0 if cfg.single_class else obj["category"]
            annotations.append(coco_annotation(obj["mask"], category, image_id, len(annotations) + 1))
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    coco = {
        "info": {"description": f"spark-det synthetic shapes, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(class_names(cfg))],
    }
    ann_file.write_text(json.dumps(coco))
    return ann_file


def write_unlabeled_images(root: Path, num_images: int, seed: int, cfg: SceneConfig) -> Path:
    """Scenes without annotations for pretraining: ``root/unlabeled/*.png``."""
    out = root / "unlabeled"
    out.mkdir(parents=True, exist_ok=True)
    for index in range(num_images):
        image, _ = render_scene(_image_rng(seed, "unlabeled", index), cfg)
        Image.fromarray(image).save(out / f"{index:06d}.png")
    return out


def make_dataset(
    root: str | Path,
    num_train: int = 200,
    num_val: int = 50,
    num_unlabeled: int = 0,
    image_size: tuple[int, int] = (128, 128),
    seed: int = 0,
    scene: Optional[SceneConfig] = None,
) -> dict[str, Path]:
    """Write the full dataset under ``root``; returns the paths of its parts."""
    root = Path(root)
    cfg = scene or SceneConfig(image_size=tuple(image_size))
    paths = {
        "root": root,
        "train_images": root / "train",
        "train_json": write_coco_split(root, "train", num_train, seed, cfg),
        "val_images": root / "val",
        "val_json": write_coco_split(root, "val", num_val, seed, cfg),
    }
    if num_unlabeled:
        paths["unlabeled"] = write_unlabeled_images(root, num_unlabeled, seed, cfg)
    return paths
