"""MMDetection 3.x training / testing with spark-det's configs (a thin mmengine Runner entry point).

    # 8 GPUs
    torchrun --nproc_per_node 8 tools/train_mmdet.py det_configs/mmdet/mask-rcnn_r50_fpn_1x_spark.py \
        --launcher pytorch --output work_dirs/r50_1x
    # resume the latest checkpoint in the work dir (weights-only loading, safe on torch >= 2.6)
    spark-det train-mmdet CONFIG --resume auto
    # evaluate a checkpoint
    spark-det train-mmdet CONFIG --test --checkpoint work_dirs/x/iter_90000.pth
    # your own COCO-format data (classes are read from the JSON)
    spark-det train-mmdet CONFIG --coco-train a.json imgs/ --coco-val b.json imgs/ \
        --cfg-options train_cfg.max_iters=1000

``--output`` and mmengine's ``--work-dir`` are the same flag; ``tools/train_mmdet.py`` is the same command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from ..cli.common import make_parser, run_tool
from ..errors import EXIT_OK, ConfigError
from ..io import coco_classes
from .checkpoint import register_weights_only_loader


def use_coco(cfg: Config, train: tuple[str, str] | None, val: tuple[str, str] | None) -> None:
    """Point the data loaders at COCO-format files and set the classes (and head sizes) from them."""
    for files in (val, train):  # both checked before anything runs; the training file's classes win
        if files is not None:
            classes = coco_classes(*files)
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


def build_parser():
    p = make_parser("spark-det train-mmdet", __doc__)
    p.add_argument("config", help="an MMDetection config, e.g. det_configs/mmdet/mask-rcnn_r50_fpn_1x_spark.py")
    p.add_argument("-o", "--output", "--work-dir", dest="work_dir", help="work directory (checkpoints, logs)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="'auto' or a checkpoint path")
    p.add_argument("--test", action="store_true", help="evaluate --checkpoint instead of training")
    p.add_argument("--checkpoint", help="the checkpoint to evaluate with --test")
    p.add_argument("--coco-train", nargs=2, metavar=("JSON", "IMAGE_DIR"), help="COCO-format training data")
    p.add_argument("--coco-val", nargs=2, metavar=("JSON", "IMAGE_DIR"), help="COCO-format validation data")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="config overrides key=value (mmengine syntax)")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                   help="how the processes were started (pytorch: torchrun)")
    return p


def build_config(args: argparse.Namespace) -> Config:
    """The config of a run: the file, the COCO data from the command line, then its overrides."""
    cfg = Config.fromfile(args.config)
    if args.coco_train or args.coco_val:
        use_coco(cfg, args.coco_train, args.coco_val)
    cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or os.path.join("work_dirs", Path(args.config).stem)
    return cfg


def _main(argv: Optional[Sequence[str]]) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        raise ConfigError(f"config {args.config} does not exist (see det_configs/mmdet/)")
    register_weights_only_loader()
    cfg = build_config(args)
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
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
