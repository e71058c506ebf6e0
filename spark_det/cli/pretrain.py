"""SparK pretraining: a folder of unlabeled images in, SparK-pretrained timm weights out.

    # one CPU smoke run
    spark-det pretrain --recipe pretrain/resnet18_smoke.yaml --data path/to/images --output out/r18
    # 8 GPUs, the paper's recipe, any key overridable
    torchrun --nproc_per_node 8 tools/pretrain.py --recipe pretrain/resnet50.yaml \\
        --data /data/imagenet/train --output out/r50 amp=bf16 batch_size=2048
    # continue an interrupted run (or: --resume path/to/checkpoint-last.pth)
    spark-det pretrain ... --output out/r50 --resume auto

Outputs in --output: config.yaml (resolved), checkpoint-last.pth (full, resumable),
encoder-<model>.pth (timm state dict, loads into timm.create_model(model, num_classes=0)),
metrics.jsonl, tensorboard/, reconstruction-epochNNN.png. From Python: spark_det.train.Pretrainer.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..errors import EXIT_OK
from .common import add_output, make_parser, parse_with_output, run_tool


def build_parser():
    p = make_parser("spark-det pretrain", __doc__)
    p.add_argument("--recipe", required=True, help="recipe file, e.g. pretrain/resnet50.yaml")
    p.add_argument("--data", required=True,
                   help="folder of images (searched recursively), a text file of paths, or WebDataset shards "
                        "('shards/train-{000000..000127}.tar', pipe: or http(s) URLs)")
    p.add_argument("--reindex", action="store_true",
                   help="rebuild the data's cached index (normally rebuilt only when the source changed)")
    p.add_argument("--shard-counts", default=None, metavar="FILE",
                   help="the shards' sample counts: OpenCLIP's sizes.json or a webdataset wids index (default: "
                        "sizes.json or shardindex.json beside the shards, else counted from the shards)")
    add_output(p, "run directory")
    p.add_argument("--resume", default=None,
                   help="'auto' (checkpoint-last.pth in --output, if any) or a checkpoint path")
    p.add_argument("--init-weights", default=None,
                   help="start a new run from weights: a spark-det full/encoder checkpoint or the paper's files")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, e.g. epochs=10 input_size=[160,256]")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..distributed import cleanup
    from ..train import Pretrainer, load_config

    parser = build_parser()
    args = parse_with_output(parser, argv, intermixed=True)  # key=value overrides may stand anywhere
    cfg = load_config(args.recipe, args.overrides)
    try:
        Pretrainer(cfg, args.data, args.output, resume=args.resume, init_weights=args.init_weights,
                   device=args.device, reindex=args.reindex, shard_counts=args.shard_counts).run()
    finally:
        cleanup()
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
