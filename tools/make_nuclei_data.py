"""A small real COCO-format instance-segmentation set for `spark-det study`: stardist's nuclei image
(shipped inside its PyPI wheel, 512 x 512 fluorescence, ~125 labelled nuclei) tiled into 128 px crops.

    # downloads the stardist 0.9.2 wheel (pip download --no-deps; nothing is installed), or pass --wheel FILE
    python tools/make_nuclei_data.py --output outputs/nuclei

Writes train.json (28 crops) and val.json (14 crops) with RLE masks, their images under images/, and 200
unlabeled crops of the train band under unlabeled/ (spark_det/demo/nuclei.py).
"""

import argparse
import sys
from pathlib import Path

from spark_det.cli.common import run_tool


def _main(argv):
    from spark_det.demo.nuclei import make_nuclei_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, help="folder to write the data set to")
    p.add_argument("--wheel", type=Path, help="a downloaded stardist wheel (default: pip download it)")
    p.add_argument("--num-unlabeled", type=int, default=200, help="unlabeled crops for SparK pretraining")
    args = p.parse_args(argv)
    paths = make_nuclei_dataset(args.output, args.wheel, num_unlabeled=args.num_unlabeled)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(_main))
