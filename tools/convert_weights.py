"""Convert SparK weights for detection frameworks.

    python tools/convert_weights.py out/r50/encoder-resnet50.pth r50.pkl --to detectron2
    python tools/convert_weights.py resnet50_1kpretrained_timm_style.pth r50_mmdet.pth --to mmdet
    python tools/convert_weights.py convnextS_1kpretrained_timm_style.pth cnxs_timm.pth --to timm

The source layout (spark-det full or encoder checkpoint, the paper's released files, plain
timm state dicts) and the architecture are detected from the keys. The output is written only
if it covers every tensor of the target backbone; otherwise the tool exits with status 1.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from spark_det.checkpoint import CheckpointError, load_file, save_atomic
from spark_det.convert import convert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=["detectron2", "mmdet", "timm", "torchvision"])
    p.add_argument("--arch", default=None, help="expected timm name (e.g. resnet50); refuse anything else")
    args = p.parse_args(argv)
    try:
        arch, converted, count = convert(load_file(args.src), args.to, args.arch)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    dst = Path(args.dst)
    if args.to == "detectron2":
        tmp = dst.with_name(f".{dst.name}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # Detectron2 reads .pkl files (numpy arrays), written atomically
            pickle.dump(converted, f)
        tmp.replace(dst)
    else:
        save_atomic(converted, dst)
    print(f"{arch}: {count} tensors -> {args.to} ({dst})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
