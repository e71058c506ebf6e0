"""Smoke test of the Detectron2 stack: Mask R-CNN R50-FPN trains and evaluates on CPU."""

from pathlib import Path

import torch

from spark_det.demo.synthetic import make_dataset

from frameworks import require

require("detectron2")


ROOT = Path(__file__).resolve().parents[2]


def _tiny_cfg(data, out_dir):
    # The repo's self-contained R50-FPN config, not detectron2.model_zoo (which imports pkg_resources,
    # gone in setuptools >= 81, on Detectron2 main).
    from detectron2.config import get_cfg

    from spark_det.d2 import add_spark_config

    cfg = get_cfg()
    add_spark_config(cfg)
    cfg.merge_from_file(str(ROOT / "det_configs/detectron2/mask_rcnn_R_50_FPN_1x_scratch.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.NORM = "BN"  # FrozenBN (the default) with random init explodes
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained model must still produce detections
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (128,), 128
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 128, 128
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("smoke_train",), ("smoke_val",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.001
    cfg.SOLVER.MAX_ITER = 2
    cfg.OUTPUT_DIR = str(out_dir)
    return cfg


def test_mask_rcnn_r50_fpn_trains_a_step_and_evaluates_with_pycocotools(tmp_path):
    from detectron2.data import (
        DatasetCatalog,
        MetadataCatalog,
        build_detection_test_loader,
        build_detection_train_loader,
    )
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import SimpleTrainer
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.modeling import build_model

    data = make_dataset(tmp_path / "data", num_train=4, num_val=2, image_size=(128, 128), seed=0)
    for name, split in (("smoke_train", "train"), ("smoke_val", "val")):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, str(data[f"{split}_json"]), str(data[f"{split}_images"]))
    cfg = _tiny_cfg(data, tmp_path / "out")
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    trainer = SimpleTrainer(model, build_detection_train_loader(cfg), optimizer)
    trainer.train(0, 2)
    losses = trainer.storage.latest()
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls"} <= set(losses)
    loss_values = {k: v[0] for k, v in losses.items() if k.startswith("loss")}
    assert all(0 <= v < 1e4 for v in loss_values.values()), loss_values  # finite

    evaluator = COCOEvaluator("smoke_val", tasks=("bbox", "segm"), output_dir=str(tmp_path / "eval"),
                              use_fast_impl=False)
    results = inference_on_dataset(model, build_detection_test_loader(cfg, "smoke_val"), evaluator)
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert 0.0 <= results[task]["AP"] <= 100.0  # NaN (no predictions at all) fails too
