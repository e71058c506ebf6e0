"""MMDetection 3.x training / testing with spark-det's configs (a thin mmengine Runner entry point).

    # 8 GPUs
    python -m torch.distributed.run --nproc_per_node 8 tools/train_mmdet.py \
        det_configs/mmdet/mask-rcnn_r50_fpn_1x_spark.py --launcher pytorch
    # resume the latest checkpoint in the work dir (weights-only loading, safe on torch >= 2.6)
    python tools/train_mmdet.py CONFIG --resume auto
    # evaluate a checkpoint
    python tools/train_mmdet.py CONFIG --test --checkpoint work_dirs/x/iter_90000.pth
    # your own COCO-format data (classes are read from the JSON)
    python tools/train_mmdet.py CONFIG --coco-train a.json imgs/ --coco-val b.json imgs/ \
        --cfg-options train_cfg.max_iters=1000
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

import spark_det.mmdet  # noqa: F401  (weights-only checkpoint loading)


def use_coco(cfg: Config, train: tuple[str, str] | None, val: tuple[str, str] | None) -> None:
    """Point the data loaders at COCO-format files and set the classes (and head sizes) from them."""
    source = train or val
    classes = tuple(c["name"] for c in sorted(json.loads(Path(source[0]).read_text())["categories"],
                                             key=lambda c: c["id"]))
    loaders = [(cfg.train_dataloader, train), (cfg.val_dataloader, val), (cfg.test_dataloader, val)]
    for loader, files in loaders:
        if files is None:
            continue
        dataset = loader.dataset
        dataset.data_root = ""
        dataset.ann_file = str(files[0])
        dataset.data_prefix = {"img": str(files[1]).rstrip("/") + "/"}
        dataset.metainfo = {"classes": classes}
    if val is not None:
        cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = str(val[0])
    for head in ("bbox_head", "mask_head"):
        if head in cfg.model.get("roi_head", {}):
            cfg.model.roi_head[head].num_classes = len(classes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--work-dir")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="'auto' or a checkpoint path")
    p.add_argument("--test", action="store_true", help="evaluate --checkpoint instead of training")
    p.add_argument("--checkpoint")
    p.add_argument("--coco-train", nargs=2, metavar=("JSON", "IMAGE_DIR"))
    p.add_argument("--coco-val", nargs=2, metavar=("JSON", "IMAGE_DIR"))
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    args = p.parse_args(argv)

    cfg = Config.fromfile(args.config)
    if args.coco_train or args.coco_val:
        use_coco(cfg, args.coco_train, args.coco_val)
    cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or os.path.join("work_dirs", Path(args.config).stem)
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    if args.test:
        if not args.checkpoint:
            p.error("--test needs --checkpoint")
        cfg.load_from = args.checkpoint
        Runner.from_cfg(cfg).test()
    else:
        Runner.from_cfg(cfg).train()


if __name__ == "__main__":
    main()
