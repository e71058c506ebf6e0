"""Pack a folder of images (or a path list) into WebDataset tar shards for pretraining.

    spark-det pack-shards --data /data/imagenet/train --output /data/shards/imagenet --shard-size 1000
    spark-det pretrain --recipe pretrain/resnet50.yaml --data '/data/shards/imagenet-{000000..001281}.tar' ...

Writes <output>-000000.tar, <output>-000001.tar, ... (the file bytes unchanged, keyed by the
folder index, so the shards train exactly like the folder), reads them back to check them, records
their sample counts in sizes.json beside them (so training never has to count them), and prints
the --data pattern to train with. Copy the shards to object storage and stream them with
--data 'pipe:aws s3 cp s3://bucket/imagenet-{000000..001281}.tar -'.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..errors import EXIT_OK
from .common import add_output, make_parser, parse_with_output, run_tool


def build_parser():
    p = make_parser("spark-det pack-shards", __doc__)
    p.add_argument("--data", required=True, help="folder of images (searched recursively) or a text file of paths")
    add_output(p, "shard prefix: writes PREFIX-000000.tar, PREFIX-000001.tar, ...")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: 1000)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards this prefix wrote before (PREFIX-NNNNNN.tar only)")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..data.packing import pack_shards

    args = parse_with_output(build_parser(), argv)
    pack_shards(args.data, args.output, args.shard_size, args.overwrite)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
