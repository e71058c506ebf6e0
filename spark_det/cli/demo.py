"""The whole idea on one CPU: SparK pretraining -> weight conversion -> Mask R-CNN transfer; this is
``spark-det study`` on built-in synthetic data (one pipeline: the demo's runs are the study's).

    spark-det demo --output outputs/demo          # what `make demo` runs (~10 min on 2 idle cores)
    spark-det demo --seeds 1 --pretrain-seed 1 --output outputs/demo_seed1   # the same demo, another seed
    spark-det demo --output outputs/long --protocol full --num-unlabeled 4000 --pretrain-epochs 3 \\
        --finetune-iters 500 --seeds 0 1 2         # the longer benchmark, docs/results/ (~40 min)

Writes results.md / results.json (box and mask AP, AP50, AP75 per framework and initialisation, SparK
minus scratch paired by seed, a verdict), ap.png, pretrain_loss.png and reconstruction.png to --output.
Run it again and it reuses finished runs (delete --output to start over). Needs Detectron2 and MMDetection.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import EXIT_OK
from .common import add_output, make_parser, parse_with_output, require_packages, run_tool


def build_parser():
    from ..demo.pipeline import FRAMEWORKS, PROTOCOLS, DemoSettings

    d = DemoSettings()
    p = make_parser("spark-det demo", __doc__)
    add_output(p, "folder for data, runs and the report", default=d.output)
    p.add_argument("--out", dest="output", help=argparse.SUPPRESS)  # the name earlier versions documented
    p.add_argument("--image-size", type=int, default=d.image_size, help="side of the square images (pixels)")
    p.add_argument("--num-unlabeled", type=int, default=d.num_unlabeled, help="unlabeled images for pretraining")
    p.add_argument("--num-train", type=int, default=d.num_train, help="labeled images for fine-tuning")
    p.add_argument("--num-val", type=int, default=d.num_val, help="labeled images for COCO evaluation")
    p.add_argument("--pretrain-size", type=int, default=d.pretrain_size, help="SparK pretraining input size")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs, help="SparK pretraining epochs")
    p.add_argument("--pretrain-batch", type=int, default=d.pretrain_batch, help="SparK pretraining batch size")
    p.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol,
                   help="frozen: train FPN and heads on the frozen backbone; full: fine-tune every layer")
    p.add_argument("--finetune-iters", type=int, default=d.finetune_iters, help="Mask R-CNN iterations per run")
    p.add_argument("--finetune-batch", type=int, default=d.finetune_batch, help="Mask R-CNN batch size")
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="one SparK and one scratch run per seed")
    p.add_argument("--pretrain-seed", type=int, default=d.pretrain_seed,
                   help="seed of the SparK pretraining (its masks, crops and initialisation)")
    p.add_argument("--frameworks", nargs="+", default=d.frameworks, choices=FRAMEWORKS,
                   help="detection frameworks to fine-tune in")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..demo.pipeline import DemoSettings, run_demo

    parser = build_parser()
    settings = DemoSettings(**vars(parse_with_output(parser, argv)))
    require_packages(["pycocotools", "matplotlib", *settings.frameworks], "spark-det demo")
    run_demo(settings)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
