"""Convert SparK weights for detection frameworks.

    spark-det convert out/r50/encoder-resnet50.pth --to detectron2 --output r50.pkl
    spark-det convert resnet50_1kpretrained_timm_style.pth r50_mmdet.pth --to mmdet
    spark-det convert convnextS_1kpretrained_timm_style.pth cnxs_timm.pth --to timm
    spark-det convert out/r50/encoder-resnet50.safetensors r50.pkl --to detectron2
    spark-det convert resnet50_1kpretrained_timm_style.pth r50.safetensors --to timm

The source layout (spark-det full or encoder checkpoint, the paper's released files, plain
timm state dicts; .pth or .safetensors) and the architecture are detected from the keys. An
output ending in .safetensors is written as safetensors (--to timm or torchvision). The output is written only
if it covers every tensor of the target backbone; otherwise the tool exits with status 1.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..errors import EXIT_OK
from .common import add_output, make_parser, parse_with_output, run_tool


def build_parser():
    from ..transfer.convert import TARGETS

    p = make_parser("spark-det convert", __doc__)
    p.add_argument("src", help="the weights to convert (any layout listed above)")
    add_output(p, "the converted file", positional="dst")
    p.add_argument("--to", required=True, choices=TARGETS, help="the target framework or layout")
    p.add_argument("--arch", default=None, help="expected timm name (e.g. resnet50); refuse anything else")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..io import load_file
    from ..transfer.convert import convert, write_converted

    parser = build_parser()
    args = parse_with_output(parser, argv)
    arch, converted, count = convert(load_file(args.src), args.to, args.arch)
    write_converted(converted, args.to, args.output, arch)
    print(f"{arch}: {count} tensors -> {args.to} ({args.output})")
    if args.to == "timm" and not any(k.startswith("head.") for k in converted):
        print("note: the file has no head.* tensors (the paper's ConvNeXt encoders have an identity final norm); "
              "load with strict=False: no feature uses them")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
