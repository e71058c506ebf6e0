"""Reconstruction grid (original | masked | reconstruction) from a full SparK checkpoint.

    spark-det visualize outputs/demo/pretrain/checkpoint-last.pth outputs/demo/data/val \\
        --output outputs/reconstruction.png --num-images 6
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import EXIT_OK
from .common import add_output, make_parser, parse_with_output, run_tool


def build_parser():
    p = make_parser("spark-det visualize", __doc__)
    p.add_argument("checkpoint", help="checkpoint-last.pth written by spark-det pretrain")
    p.add_argument("images", help="folder of images or a text file of paths")
    add_output(p, "the PNG to write", default="reconstruction.png")
    p.add_argument("--out", dest="output", help=argparse.SUPPRESS)  # the name earlier versions documented
    p.add_argument("--num-images", type=int, default=8, help="how many images (rows) to show")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..train.visualize import reconstruction_grid_from_checkpoint

    parser = build_parser()
    args = parse_with_output(parser, argv)
    if args.num_images < 1:
        parser.error(f"--num-images must be at least 1, got {args.num_images}")
    path, count, cfg = reconstruction_grid_from_checkpoint(args.checkpoint, args.images, args.output,
                                                           args.num_images, args.seed)
    print(f"wrote {path} ({count} images, {cfg['model']}, mask ratio {cfg['mask_ratio']})")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
