"""Converted SparK ResNets load into Detectron2's ResNet and reproduce the encoder's features."""

import pytest
import torch

from spark_det.model.encoder import SparseEncoder

from frameworks import (
    assert_every_tensor_from_file,
    assert_same_features,
    convert_encoder,
    load_into_detectron2,
    require,
)

require("detectron2")


def _randomised_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("depth", [18, 50])
def test_detectron2_resnet_reproduces_the_spark_encoder_features(tmp_path, depth):
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    encoder = SparseEncoder(f"resnet{depth}")
    _randomised_stats(encoder)
    converted_file = convert_encoder(encoder, tmp_path, "detectron2")

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # timm/torchvision put the stride in the 3x3 conv
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    for p in backbone.parameters():  # make "left at init" detectable
        torch.nn.init.constant_(p, 0.123)

    converted = load_into_detectron2(backbone, converted_file)
    assert_every_tensor_from_file(backbone.state_dict(), converted)

    x = torch.randn(2, 3, 96, 128)
    encoder.eval()
    with torch.no_grad():
        expected = encoder(x)
        got = backbone(x)
    assert_same_features([got[k] for k in ["res2", "res3", "res4", "res5"]], expected)
