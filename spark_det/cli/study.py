"""Does SparK pretraining on my unlabeled images give a better detector than what I would otherwise start from?

    spark-det study --unlabeled /data/plant/unlabeled \\
        --train-json train.json --val-json val.json --images /data/plant/images \\
        --model resnet50 --output out/plant_study \\
        --init spark scratch timm:/weights/resnet50_a1_in1k.pth \\
        --frameworks detectron2 mmdet --protocol frozen full --seeds 0 1 2 \\
        --pretrain-set epochs=100 batch_size=64 input_size=[224,224]

--init: spark (SparK pretraining on --unlabeled with the model's recipe, pretrain/<model>.yaml, or
--spark-weights FILE), scratch (random initialisation), timm:FILE / torchvision:FILE (a supervised
checkpoint you have; nothing is downloaded). Every init gets the same Mask R-CNN (Faster R-CNN when the
JSON has no masks), config, budget and images in the same order, but for the weights.
--protocol: frozen (the backbone stays as initialised; detection's linear probe) and/or full (every
layer fine-tuned). Defaults from the data: about 12 epochs of batch 2 per GPU (at least 100 iterations),
and the images' median short side (multiples of 32, 64-800 px).

Runs on the CPU (fine-tunes side by side, one thread each) or on every visible GPU (--num-gpus;
Detectron2's own launcher, torchrun for MMDetection and pretraining). Resumable: run the same command
again and it continues; finished runs are not redone. Writes results.md / results.json / ap.png to
--output: box/mask AP, AP50, AP75 per init, framework and protocol, mean ± std over seeds, the paired
difference between every two inits and a verdict that says when it is within seed noise.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..errors import EXIT_OK
from .common import add_output, make_parser, parse_with_output, run_tool


def build_parser():
    from ..study.finetune import FRAMEWORKS, PROTOCOLS

    p = make_parser("spark-det study", __doc__)
    add_output(p, "study folder: pretraining, weights, runs and the report")
    p.add_argument("--unlabeled", help="unlabeled images for SparK: a folder, a text file of paths, or shards")
    p.add_argument("--train-json", required=True, help="COCO-format training annotations")
    p.add_argument("--val-json", required=True, help="COCO-format validation annotations (the AP is measured here)")
    p.add_argument("--images", required=True, help="folder the JSON files' file_name entries are relative to")
    p.add_argument("--val-images", help="the val JSON's image folder, if not --images")
    p.add_argument("--model", default="resnet50", help="backbone: resnet18, resnet34, resnet50, resnet101, resnet152")
    p.add_argument("--init", dest="inits", nargs="+", default=["spark", "scratch"],
                   help="what to compare: spark, scratch, timm:FILE, torchvision:FILE")
    p.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS,
                   help="detection frameworks to fine-tune in")
    p.add_argument("--protocol", dest="protocols", nargs="+", default=["frozen"], choices=PROTOCOLS,
                   help="frozen: train FPN and heads on the frozen backbone; full: fine-tune every layer")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (one run per init each)")
    p.add_argument("--spark-weights", help="SparK weights to use instead of pretraining (e.g. a finished run's "
                                           "encoder-<model>.pth or the paper's release)")
    p.add_argument("--init-weights", help="start the SparK pretraining from these weights (e.g. the paper's "
                                          "release, continued on your domain)")
    p.add_argument("--pretrain-recipe", help="pretraining recipe (default: pretrain/<model>.yaml)")
    p.add_argument("--pretrain-set", dest="pretrain_overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="pretraining recipe overrides, e.g. epochs=100 batch_size=64")
    p.add_argument("--pretrain-seed", type=int, default=0, help="seed of the SparK pretraining")
    p.add_argument("--iters", type=int, help="fine-tuning iterations (default: about 12 epochs, at least 100)")
    p.add_argument("--batch", type=int, help="fine-tuning batch, all GPUs together (default: 2 per GPU)")
    p.add_argument("--image-size", type=int, help="fine-tuning short side in pixels (default: the images' median)")
    p.add_argument("--num-gpus", type=int, help="GPUs per run (default: every visible one; 0: the CPU)")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..study.pipeline import StudySettings, run_study

    args = parse_with_output(build_parser(), argv)
    run_study(StudySettings(**vars(args)))
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
