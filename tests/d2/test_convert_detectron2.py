"""Converted SparK ResNets load into Detectron2's ResNet and reproduce the encoder's features."""

import pickle

import pytest
import torch

from spark_det.checkpoint import save_atomic
from spark_det.encoder import SparseEncoder

from frameworks import require

require("detectron2")
import convert_weights  # noqa: E402  (tools/)


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
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    encoder = SparseEncoder(f"resnet{depth}")
    _randomised_stats(encoder)
    src = save_atomic(encoder.dense_state_dict(), tmp_path / "encoder.pth")
    assert convert_weights.main([str(src), str(tmp_path / "r.pkl"), "--to", "detectron2"]) == 0

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

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.bottom_up = backbone

    DetectionCheckpointer(Holder()).load(str(tmp_path / "r.pkl"))
    with open(tmp_path / "r.pkl", "rb") as f:
        converted = pickle.load(f)["model"]
    loaded = backbone.state_dict()
    assert set(loaded) == set(converted), set(loaded) ^ set(converted)  # every tensor comes from the file
    for name, value in loaded.items():
        assert torch.equal(value, torch.as_tensor(converted[name])), name

    x = torch.randn(2, 3, 96, 128)
    encoder.eval()
    with torch.no_grad():
        expected = encoder(x)
        got = backbone(x)
    for feat, key in zip(expected, ["res2", "res3", "res4", "res5"]):
        # fp32 accumulation order differs between implementations: tolerance relative to the scale
        assert (got[key] - feat).abs().max() <= 1e-5 * feat.abs().max(), (got[key] - feat).abs().max()
