"""The synthetic COCO data set: deterministic, valid COCO, masks agree with boxes, not trivial."""

import hashlib
import json

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from spark_det.demo.synthetic import CLASSES, make_dataset


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    a = make_dataset(tmp_path / "a", 6, 3, 4, (96, 128), seed=7)
    b = make_dataset(tmp_path / "b", 6, 3, 4, (96, 128), seed=7)
    c = make_dataset(tmp_path / "c", 6, 3, 4, (96, 128), seed=8)
    assert _digest(a["root"]) == _digest(b["root"])
    assert _digest(a["root"]) != _digest(c["root"])


def test_a_subset_is_a_prefix_of_a_larger_set(tmp_path):
    small = make_dataset(tmp_path / "s", 3, 1, 0, (64, 64), seed=1)
    large = make_dataset(tmp_path / "l", 6, 1, 0, (64, 64), seed=1)
    for i in range(3):
        name = f"train/{i:06d}.png"
        assert (small["root"] / name).read_bytes() == (large["root"] / name).read_bytes()


def test_annotations_load_in_pycocotools_and_masks_agree_with_boxes(tmp_path):
    data = make_dataset(tmp_path / "d", 20, 5, 0, (128, 160), seed=0)
    coco = COCO(str(data["train_json"]))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 20
    for ann in anns:
        image = coco.loadImgs(ann["image_id"])[0]
        assert (data["train_images"] / image["file_name"]).is_file()
        mask = coco.annToMask(ann)
        assert mask.shape == (128, 160)
        ys, xs = np.nonzero(mask)
        x0, y0, w, h = ann["bbox"]
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x0 + w, y0 + h)
        assert ann["area"] == mask.sum() > 0


def test_scenes_have_variety_and_occlusion(tmp_path):
    data = make_dataset(tmp_path / "d", 40, 1, 0, (128, 128), seed=0)
    coco = json.loads(data["train_json"].read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])
    assert per_image.max() >= 3  # several objects per scene
    assert len({a["category_id"] for a in coco["annotations"]}) == len(CLASSES)
    areas = [a["area"] for a in coco["annotations"]]
    assert max(areas) > 8 * min(areas)  # different scales
    # occlusion: some visible masks are smaller than their box's shape would allow (holes / bites)
    fill = [a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in coco["annotations"]]
    assert min(fill) < 0.3 and max(fill) > 0.9
    rle = coco["annotations"][0]["segmentation"]
    assert mask_utils.area(rle) == coco["annotations"][0]["area"]


def test_single_class_labels_the_same_images_and_masks_as_one_object_class(tmp_path):
    from spark_det.demo.synthetic import SceneConfig

    shapes = make_dataset(tmp_path / "shapes", 8, 2, 0, seed=3, scene=SceneConfig(image_size=(64, 64)))
    objects = make_dataset(tmp_path / "objects", 8, 2, 0, seed=3,
                           scene=SceneConfig(image_size=(64, 64), single_class=True))
    for split in ("train", "val"):
        a = json.loads(shapes[f"{split}_json"].read_text())
        b = json.loads(objects[f"{split}_json"].read_text())
        assert [c["name"] for c in b["categories"]] == ["object"]
        assert {ann["category_id"] for ann in b["annotations"]} == {1}
        assert len({ann["category_id"] for ann in a["annotations"]}) > 1
        strip = [{k: v for k, v in ann.items() if k != "category_id"} for ann in a["annotations"]]
        assert strip == [{k: v for k, v in ann.items() if k != "category_id"} for ann in b["annotations"]]
        for image in a["images"]:
            name = f"{split}/{image['file_name']}"
            assert (shapes["root"] / name).read_bytes() == (objects["root"] / name).read_bytes()
