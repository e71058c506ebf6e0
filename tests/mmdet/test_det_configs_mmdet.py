"""Every MMDetection config in det_configs/, shrunk by command-line overrides only, trains from
converted SparK weights through tools/train_mmdet.py, reports COCO AP, and resumes safely."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from frameworks import TIMM_SHRINK, converted_spark_encoders, pretrained_exports, require

require("mmdet")
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "det_configs" / "mmdet").glob("mask-rcnn_*.py"))
SHRINK = [
    "train_dataloader.batch_size=2", "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
    "val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False",
    "test_dataloader.num_workers=0", "test_dataloader.persistent_workers=False",
    "model.train_cfg.rpn_proposal.nms_pre=200", "model.train_cfg.rpn_proposal.max_per_img=50",
    "model.test_cfg.rpn.nms_pre=200", "model.test_cfg.rpn.max_per_img=50", "model.train_cfg.rcnn.sampler.num=32",
    "model.test_cfg.rcnn.score_thr=0.0",  # an untrained model must still produce detections
    "param_scheduler=[]", "log_processor.by_epoch=False", "default_hooks.logger.interval=1",
    "default_hooks.checkpoint.interval=1", "default_hooks.checkpoint.by_epoch=False",
]


@pytest.fixture(scope="module")
def spark_weights(tmp_path_factory):
    """SparK encoders exported by spark-det and converted by tools/convert_weights.py; for the
    generic timm backbone, exports of 2 pretraining iterations, used as they are."""
    folder = tmp_path_factory.mktemp("weights")
    return {**converted_spark_encoders(folder, "mmdet"), **pretrained_exports(folder)}


def _shrink_schedule(config):
    """Two iterations, in the config's own loop type (epoch-based: one epoch of 4 images / 2)."""
    from mmengine.config import Config

    if Config.fromfile(str(config)).train_cfg.type == "EpochBasedTrainLoop":
        return ["train_cfg.max_epochs=1", "train_cfg.val_interval=1"]
    return ["train_cfg.max_iters=2", "train_cfg.val_interval=2"]


def _train(config, tiny_coco, work_dir, *extra, options=()):
    cmd = [sys.executable, "tools/train_mmdet.py", str(config), "--work-dir", str(work_dir),
           "--coco-train", str(tiny_coco["train_json"]), str(tiny_coco["train_images"]),
           "--coco-val", str(tiny_coco["val_json"]), str(tiny_coco["val_images"]), *extra,
           "--cfg-options", *SHRINK, *_shrink_schedule(config), *options]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def _final_metrics(work_dir):
    rows = [json.loads(line) for f in sorted(Path(work_dir).glob("*/vis_data/scalars.json"))
            for line in f.read_text().splitlines() if "coco/bbox_mAP" in line]
    return rows[-1]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_from_spark_weights_and_reports_coco_ap(config, tiny_coco, spark_weights, tmp_path):
    shrink_arch = []
    timm_family = next((family for family in TIMM_SHRINK if family in config.name), None)
    if "convnext" in config.name:  # same config and recipe, smallest ConvNeXt; AMP needs CUDA
        arch = "convnext_atto"
        shrink_arch = [f"model.backbone.arch={arch}", "model.neck.in_channels=[40,80,160,320]",
                       "optim_wrapper.type=OptimWrapper"]
    elif timm_family:
        arch, channels = TIMM_SHRINK[timm_family]
        shrink_arch = [f"model.backbone.arch={arch}", f"model.neck.in_channels={channels}".replace(" ", "")]
    else:
        arch = "resnet18" if "r18" in config.name else "resnet50"
    weights = spark_weights[arch]
    if timm_family:  # the generic backbone loads the spark-det export itself, every tensor checked
        log = _train(config, tiny_coco, tmp_path, options=[f"model.backbone.checkpoint={weights}", *shrink_arch])
        assert f"SparKTimm {arch}: every backbone tensor from {weights}" in log
    else:
        log = _train(config, tiny_coco, tmp_path,
                     options=[f"model.backbone.init_cfg.checkpoint={weights}", *shrink_arch])
        assert f"Loads checkpoint by _checkpoint_weights_only backend from path: {weights}" in log
    assert "missing keys in source state_dict" not in log and "unexpected key in source state_dict" not in log
    final = _final_metrics(tmp_path)
    for key in ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_50"):
        assert 0.0 <= final[key] <= 1.0, (key, final[key])


@pytest.mark.slow
def test_interrupted_training_resumes_weights_only_on_new_torch(tiny_coco, spark_weights, tmp_path):
    config = ROOT / "det_configs" / "mmdet" / "mask-rcnn_r18_fpn_cpu_demo.py"
    init = [f"model.backbone.init_cfg.checkpoint={spark_weights['resnet18']}"]
    _train(config, tiny_coco, tmp_path, options=init)  # 2 iterations, checkpoint every iteration
    assert (tmp_path / "iter_2.pth").is_file()
    log = _train(config, tiny_coco, tmp_path, "--resume", "auto", options=[*init, "train_cfg.max_iters=3",
                                                                      "train_cfg.val_interval=3"])
    assert "resumed epoch: 0, iter: 2" in log
    assert "Iter(train) [3/3]" in log
