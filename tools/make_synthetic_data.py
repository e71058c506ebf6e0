"""Write the synthetic COCO-format instance-segmentation data set (and unlabeled images).

    python tools/make_synthetic_data.py outputs/shapes --num-train 200 --num-val 50 --num-unlabeled 1000
"""

from __future__ import annotations

import argparse
import sys

from spark_det.synthetic import make_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-val", type=int, default=50)
    p.add_argument("--num-unlabeled", type=int, default=0)
    p.add_argument("--image-size", type=int, nargs=2, default=[128, 128], metavar=("HEIGHT", "WIDTH"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = make_dataset(args.root, args.num_train, args.num_val, args.num_unlabeled, tuple(args.image_size), args.seed)
    for name, path in paths.items():
        print(f"{name:13s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
