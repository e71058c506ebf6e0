"""Detectron2 training / evaluation with spark-det's configs (Detectron2's train_net.py pattern).

    # 8 GPUs, the paper's ResNet-50 1x recipe from converted SparK weights
    python tools/train_det2.py --config-file det_configs/detectron2/mask_rcnn_R_50_FPN_1x_spark.yaml \
        --num-gpus 8 MODEL.WEIGHTS r50_spark.pkl
    # evaluate a trained model / resume an interrupted run
    python tools/train_det2.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_det2.py --config-file ... --resume
    # a COCO-format dataset of your own (repeatable): NAME JSON IMAGE_DIR
    python tools/train_det2.py --config-file ... --register-coco my_train a.json imgs/ \
        --register-coco my_val b.json imgs/ DATASETS.TRAIN '("my_train",)' DATASETS.TEST '("my_val",)'

Multi-machine launch is Detectron2's own: --num-machines, --machine-rank, --dist-url.
"""

from __future__ import annotations

import importlib

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator

from spark_det.d2 import add_spark_config, build_layer_decay_optimizer


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


def setup(args):
    cfg = get_cfg()
    add_spark_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
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
    parser = default_argument_parser()
    parser.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO-format dataset under NAME (repeatable)")
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
