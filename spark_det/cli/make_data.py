"""Write the synthetic COCO-format instance-segmentation data set (and unlabeled images), or with
--stardist-nuclei a small real one: stardist's fluorescence nuclei image (inside its PyPI wheel) tiled
into 28 train / 14 val COCO crops of 128 px with RLE masks, and unlabeled crops of the train band.

    spark-det make-data --output outputs/shapes --num-train 200 --num-val 50 --num-unlabeled 1000
    spark-det make-data --stardist-nuclei --output outputs/nuclei --num-unlabeled 200   # pip-downloads the wheel
    spark-det make-data --stardist-nuclei stardist-0.9.2-cp311-...whl --output outputs/nuclei --num-unlabeled 200
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..errors import EXIT_OK
from .common import add_output, make_parser, parse_with_output, require_packages, run_tool


def build_parser():
    p = make_parser("spark-det make-data", __doc__)
    add_output(p, "folder to write the data set into", positional="root")
    p.add_argument("--num-train", type=int, default=200, help="labeled training images")
    p.add_argument("--num-val", type=int, default=50, help="labeled validation images")
    p.add_argument("--num-unlabeled", type=int, default=0, help="unlabeled images (for pretraining)")
    p.add_argument("--image-size", type=int, nargs=2, default=[128, 128], metavar=("HEIGHT", "WIDTH"),
                   help="image height and width in pixels")
    p.add_argument("--seed", type=int, default=0, help="the data set is a pure function of this seed")
    p.add_argument("--single-class", action="store_true",
                   help='label every shape with one class, "object" (the demo\'s labels); default: six shape classes')
    p.add_argument("--stardist-nuclei", nargs="?", const="download", metavar="WHEEL",
                   help="real images instead: stardist's nuclei image from its wheel (a downloaded .whl, or "
                        "none: pip download --no-deps stardist==0.9.2, nothing installed); --num-unlabeled "
                        "random crops of the train band")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..demo.synthetic import SceneConfig, make_dataset

    parser = build_parser()
    args = parse_with_output(parser, argv)
    require_packages(["pycocotools"], "spark-det make-data")  # before anything is written
    if min(args.num_train, args.num_val, args.num_unlabeled) < 0 or min(args.image_size) < 16:
        parser.error("image counts must be >= 0 and image sides >= 16 pixels")
    if args.stardist_nuclei:
        from pathlib import Path

        from ..demo.nuclei import make_nuclei_dataset

        wheel = None if args.stardist_nuclei == "download" else Path(args.stardist_nuclei)
        paths = make_nuclei_dataset(args.output, wheel, num_unlabeled=args.num_unlabeled)
    else:
        scene = SceneConfig(image_size=tuple(args.image_size), single_class=args.single_class)
        paths = make_dataset(args.output, args.num_train, args.num_val, args.num_unlabeled, seed=args.seed,
                             scene=scene)
    for name, path in paths.items():
        print(f"{name:13s} {path}")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
