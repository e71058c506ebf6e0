"""Smoke test of the MMDetection stack: Mask R-CNN R50-FPN trains and evaluates on CPU."""


from spark_det.demo.synthetic import CLASSES, make_dataset

from frameworks import require

require("mmdet")


def test_mmcv_has_its_compiled_ops():
    import torch
    from mmcv.ops import RoIAlign, nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    feats = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    roi_align = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    pooled = roi_align(feats, torch.tensor([[0, 0, 0, 4, 4.]]))
    assert pooled.shape == (1, 1, 2, 2)


def test_mask_rcnn_r50_fpn_trains_a_step_and_evaluates_with_pycocotools(tmp_path):
    from mmengine.config import Config
    from mmengine.runner import Runner

    data = make_dataset(tmp_path / "data", num_train=4, num_val=2, image_size=(128, 128), seed=0)
    config_file = tmp_path / "mask_rcnn.py"  # inherit from the config mmdet ships, as users do
    config_file.write_text('_base_ = "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"\n')
    cfg = Config.fromfile(str(config_file))
    metainfo = {"classes": CLASSES}
    pipeline_scale = (128, 128)
    cfg.model.roi_head.bbox_head.num_classes = len(CLASSES)
    cfg.model.roi_head.mask_head.num_classes = len(CLASSES)
    cfg.model.backbone.init_cfg = None
    cfg.model.train_cfg.rpn_proposal.nms_pre = 200
    cfg.model.train_cfg.rpn_proposal.max_per_img = 50
    cfg.model.train_cfg.rcnn.sampler.num = 32
    cfg.model.test_cfg.rpn.nms_pre = 200
    cfg.model.test_cfg.rpn.max_per_img = 50
    cfg.model.test_cfg.rcnn.score_thr = 0.0  # a model trained 2 iterations must still detect (AP is computed)
    for loader, split in ((cfg.train_dataloader, "train"), (cfg.val_dataloader, "val"), (cfg.test_dataloader, "val")):
        loader.batch_size = 2
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.dataset.data_root = ""
        loader.dataset.metainfo = metainfo
        loader.dataset.ann_file = str(data[f"{split}_json"])
        loader.dataset.data_prefix = {"img": str(data[f"{split}_images"]) + "/"}
        for step in loader.dataset.pipeline:
            if step["type"] == "Resize":
                step["scale"] = pipeline_scale
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        evaluator.ann_file = str(data["val_json"])
    cfg.train_cfg = {"type": "IterBasedTrainLoop", "max_iters": 2, "val_interval": 2}
    cfg.param_scheduler = []
    cfg.optim_wrapper.optimizer.lr = 0.001
    cfg.default_hooks.checkpoint = {"type": "CheckpointHook", "interval": 1000}
    cfg.default_hooks.logger = {"type": "LoggerHook", "interval": 1}
    cfg.work_dir = str(tmp_path / "work")
    cfg.visualizer.vis_backends = [{"type": "LocalVisBackend"}]
    runner = Runner.from_cfg(cfg)
    runner.train()
    train_loss = runner.message_hub.get_scalar("train/loss").current()
    assert 0 <= train_loss < 1e4, train_loss  # finite
    metrics = runner.val_loop.run()
    for key in ("coco/bbox_mAP", "coco/segm_mAP", "coco/bbox_mAP_50"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0
