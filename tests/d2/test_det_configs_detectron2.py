"""Every Detectron2 config in det_configs/, shrunk by command-line overrides only, trains from
converted SparK weights through tools/train_det2.py and reports COCO box and mask AP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from frameworks import TIMM_SHRINK, converted_spark_encoders, pretrained_exports, require

require("detectron2")
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "det_configs" / "detectron2").glob("mask_rcnn_*.yaml"))
SHRINK = [
    "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "INPUT.MASK_FORMAT", "bitmask",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.NUM_CLASSES", "6",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
    "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1", "TEST.PRECISE_BN.ENABLED", "False",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TRAIN", '("cfg_train",)', "DATASETS.TEST", '("cfg_val",)',
]


@pytest.fixture(scope="module")
def spark_weights(tmp_path_factory):
    """SparK encoders exported by spark-det and converted by tools/convert_weights.py; for the
    generic timm backbone, exports of 2 pretraining iterations, used as they are."""
    folder = tmp_path_factory.mktemp("weights")
    return {**converted_spark_encoders(folder, "detectron2"), **pretrained_exports(folder)}


def test_there_are_configs_for_the_paper_recipes():
    names = {c.name for c in CONFIGS}
    assert {"mask_rcnn_R_50_FPN_1x_spark.yaml", "mask_rcnn_R_50_FPN_2x_spark.yaml",
            "mask_rcnn_R_50_FPN_1x_supervised.yaml", "mask_rcnn_R_50_FPN_1x_scratch.yaml",
            "mask_rcnn_convnext_base_FPN_3x_spark.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_and_reports_coco_ap(config, tiny_coco, spark_weights, tmp_path):
    shrink_arch = []
    timm_family = next((family for family in TIMM_SHRINK if family in config.name), None)
    if "convnext" in config.name:  # same config and recipe, smallest ConvNeXt
        arch, shrink_arch = "convnext_atto", ["MODEL.CONVNEXT.NAME", "convnext_atto"]
    elif timm_family:  # the generic backbone loads the export itself (MODEL.TIMM.WEIGHTS)
        arch = TIMM_SHRINK[timm_family][0]
        shrink_arch = ["MODEL.TIMM.NAME", arch, "MODEL.TIMM.WEIGHTS", str(spark_weights[arch])]
    else:
        arch = "resnet18" if "R_18" in config.name else "resnet50"
    weights = "" if "scratch" in config.name or timm_family else str(spark_weights[arch])
    cmd = [sys.executable, "tools/train_det2.py", "--config-file", str(config),
           "--register-coco", "cfg_train", str(tiny_coco["train_json"]), str(tiny_coco["train_images"]),
           "--register-coco", "cfg_val", str(tiny_coco["val_json"]), str(tiny_coco["val_images"]),
           *SHRINK, *shrink_arch, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    if weights:  # Detectron2 lists missing/unexpected keys one group per line: none may be the backbone's
        assert f"Loading from {weights}" in log
        assert not [line for line in log.splitlines() if line.startswith("backbone.bottom_up")]
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    final = next(r for r in reversed(rows) if "bbox/AP" in r)
    for key in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50"):
        assert 0.0 <= final[key] <= 100.0, (key, final[key])
