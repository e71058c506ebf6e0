"""Reconstruction grid (original | masked | reconstruction) from a full SparK checkpoint.

    python tools/visualize.py outputs/demo/pretrain/checkpoint-last.pth outputs/demo/data/val \
        --out outputs/reconstruction.png --num-images 6
"""

from __future__ import annotations

import argparse
import sys

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from spark_det.checkpoint import CheckpointError, load_file
from spark_det.data import NoImagesError, find_images, load_rgb
from spark_det.models import create_spark
from spark_det.spark import IMAGENET_MEAN, IMAGENET_STD
from spark_det.visualize import save_reconstruction_grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint-last.pth written by tools/pretrain.py")
    p.add_argument("images", help="folder of images or a text file of paths")
    p.add_argument("--out", default="reconstruction.png")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    args = p.parse_args(argv)
    try:
        ckpt = load_file(args.checkpoint)
        if "config" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"{args.checkpoint} is not a full spark-det checkpoint (needs 'model' and 'config'); "
                                  "an exported encoder has no decoder to reconstruct with")
        paths = find_images(args.images)[: args.num_images]
    except (CheckpointError, NoImagesError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cfg = ckpt["config"]
    model = create_spark(cfg["model"], mask_ratio=cfg["mask_ratio"], decoder_width=cfg["decoder_width"])
    model.load_state_dict(ckpt["model"])
    size = tuple(cfg["input_size"])
    to_tensor = transforms.Compose([
        transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    images = torch.stack([to_tensor(load_rgb(path)) for path in paths])
    path = save_reconstruction_grid(model, images, args.out, seed=args.seed)
    print(f"wrote {path} ({len(paths)} images, {cfg['model']}, mask ratio {cfg['mask_ratio']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
