"""Which timm CNN families SparK runs, and how: the table of the docs' supported-models page
(docs/models.md), computed from the models.

    python -m spark_det.model.families                          # print the markdown table
    python -m spark_det.model.families --write docs/models.md   # replace the table between its markers

For one small model per family it builds the sparse encoder on both implementations (with the
construction probe, which refuses a model whose features depend on masked patches) and reports
"fast" when some blocks run on gathered visible rows (:mod:`spark_det.sparse.blocks`), "per layer"
when every layer is converted on its own, or the refusal, which names the layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

# family -> the model that represents it (the smallest timm has, to keep the table quick to make)
FAMILIES: dict[str, str] = {
    "ResNet": "resnet18", "ResNet-D": "resnet26d", "SE-ResNeXt": "seresnext26d_32x4d",
    "Res2Net": "res2net50_14w_8s", "ResNeSt": "resnest14d", "SK-ResNet": "skresnet18", "ECA-ResNet": "ecaresnet26t",
    "ResNet-Blur": "resnetblur18", "GC-ResNeXt": "gcresnext26ts", "ResNetV2 / BiT (GroupNorm)": "resnetv2_50d_gn",
    "ResNetV2 (FilterResponseNorm)": "resnetv2_50d_frn", "ResNetV2 (EvoNorm)": "resnetv2_50d_evos",
    "RegNetX": "regnetx_002", "RegNetY": "regnety_002", "RegNetZ": "regnetz_005", "CSPDarkNet": "cs3darknet_s",
    "DLA": "dla34", "DPN": "dpn48b", "RepVGG": "repvgg_a0", "MobileOne": "mobileone_s0", "DenseNet": "densenet121",
    "VoVNet": "ese_vovnet19b_slim_dw", "EfficientNet": "efficientnet_b0", "EfficientNet (TF)": "tf_efficientnet_b0",
    "MobileNetV3": "mobilenetv3_small_100", "MobileNetV4": "mobilenetv4_conv_small", "MixNet": "mixnet_s",
    "ReXNet": "rexnet_100", "LCNet": "lcnet_050", "GhostNet": "ghostnet_100", "FastViT": "fastvit_t8",
    "PoolFormerV2": "poolformerv2_s12", "ConvNeXt": "convnext_atto", "ConvNeXt-V2": "convnextv2_atto",
    "LambdaNet": "lambda_resnet26t", "HRNet": "hrnet_w18_small", "HGNetV2": "hgnetv2_b0",
}
START, END = "<!-- timm-support-table:start -->", "<!-- timm-support-table:end -->"
PAGE = "docs/models.md"  # the page that holds the table, between START and END


def support(model: str) -> str:
    """'fast', 'per layer' or 'refused: <reason naming the layer>' for a timm model."""
    from ..model.encoder import SparseEncoder
    from ..sparse.blocks import RowBlock

    try:
        SparseEncoder(model, impl="reference")
        encoder = SparseEncoder(model, impl="fast")
    except (TypeError, ValueError) as exc:
        return f"refused: {str(exc).splitlines()[0]}"
    return "fast" if any(isinstance(m, RowBlock) for m in encoder.modules()) else "per layer"


def table(families: Optional[dict[str, str]] = None) -> str:
    rows = ["| family | model | sparse execution |", "|---|---|---|"]
    for family, model in (families or FAMILIES).items():
        status = support(model).replace("|", "\\|")
        rows.append(f"| {family} | `{model}` | {status} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", default=None,
                        help=f"a markdown file whose table (between its markers) to replace: {PAGE}")
    args = parser.parse_args(argv)
    text = table()
    if args.write is None:
        print(text)
        return 0
    path = Path(args.write)
    doc = path.read_text()
    if START not in doc or END not in doc:
        print(f"error: {path} has no {START} ... {END} markers (the table lives in {PAGE})", file=sys.stderr)
        return 2
    head, rest = doc.split(START, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
