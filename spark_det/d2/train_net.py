"""Detectron2 training / evaluation with spark-det's configs (Detectron2's train_net.py pattern).

    # 8 GPUs, the paper's ResNet-50 1x recipe from converted SparK weights
    spark-det train-det2 --config-file det_configs/detectron2/mask_rcnn_R_50_FPN_1x_spark.yaml \
        --num-gpus 8 --output out/r50_1x MODEL.WEIGHTS r50_spark.pkl
    # evaluate a trained model / resume an interrupted run
    spark-det train-det2 --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    spark-det train-det2 --config-file ... --resume
    # a COCO-format dataset of your own (repeatable): NAME JSON IMAGE_DIR
    spark-det train-det2 --config-file ... --register-coco my_train a.json imgs/ \
        --register-coco my_val b.json imgs/ DATASETS.TRAIN '("my_train",)' DATASETS.TEST '("my_val",)'

Multi-machine launch is Detectron2's own: --num-machines, --machine-rank, --dist-url.
``--output DIR`` is spark-det's name for Detectron2's ``OUTPUT_DIR DIR``; ``tools/train_det2.py`` is
the same command.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional, Sequence

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator

from ..cli.common import run_tool
from ..errors import EXIT_OK, ConfigError
from ..io import coco_classes
from . import add_spark_config, build_layer_decay_optimizer


def _has_compiled_ops() -> bool:
    try:
        compiled = importlib.import_module("detectron2._C")
    except ImportError:
        return False
    return not getattr(compiled, "SPARK_DET_FALLBACK", False)


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # pycocotools' COCOeval unless Detectron2's compiled fast evaluator is really there
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)  # not inferred from (maybe no) predictions
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder or cfg.OUTPUT_DIR,
                             use_fast_impl=_has_compiled_ops())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_layer_decay_optimizer(cfg, model)


def build_config(args) -> CfgNode:
    """The frozen config of a run: the file, then the command line's overrides."""
    cfg = get_cfg()
    add_spark_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def setup(args):
    cfg = build_config(args)
    default_setup(cfg, args)
    return cfg


def train(args):
    """What each launched process runs (Detectron2's ``main(args)``)."""
    for name, json_file, image_root in args.register_coco or []:
        register_coco_instances(name, {}, json_file, image_root)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def build_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.prog = "spark-det train-det2"
    parser.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO-format dataset under NAME (repeatable)")
    parser.add_argument("-o", "--output", default=None, help="output directory (Detectron2's OUTPUT_DIR)")
    return parser


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    if not args.config_file or not Path(args.config_file).is_file():
        raise ConfigError(f"--config-file {args.config_file!r} does not exist (see det_configs/detectron2/)")
    for _, coco_json, image_dir in args.register_coco or []:
        coco_classes(coco_json, image_dir)  # a bad file is one line now, not a traceback at the first batch
    if args.output:
        args.opts = [*args.opts, "OUTPUT_DIR", args.output]
    launch(train, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
