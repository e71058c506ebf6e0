"""Converted SparK ResNets load into MMDetection's ResNet and reproduce the encoder's features."""

import pytest
import torch

from spark_det.checkpoint import save_atomic
from spark_det.encoder import SparseEncoder

from frameworks import require

require("mmdet")
import convert_weights  # noqa: E402  (tools/)


@pytest.mark.parametrize("depth", [18, 50])
def test_mmdet_resnet_reproduces_the_spark_encoder_features(tmp_path, depth):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    encoder = SparseEncoder(f"resnet{depth}")
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    src = save_atomic(encoder.dense_state_dict(), tmp_path / "encoder.pth")
    dst = tmp_path / "r_mmdet.pth"
    assert convert_weights.main([str(src), str(dst), "--to", "mmdet"]) == 0

    backbone = MODELS.build(dict(
        type="ResNet", depth=depth, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1, style="pytorch",
        norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False,
        init_cfg=dict(type="Pretrained", checkpoint=str(dst)),
    ))
    for p in backbone.parameters():
        torch.nn.init.constant_(p, 0.123)
    backbone.init_weights()
    backbone.eval()
    converted = torch.load(dst, weights_only=True)["state_dict"]
    loaded = backbone.state_dict()
    assert set(loaded) == set(converted), set(loaded) ^ set(converted)  # every tensor comes from the file
    for name, value in loaded.items():
        assert torch.equal(value, converted[name]), name

    x = torch.randn(2, 3, 96, 128)
    encoder.eval()
    with torch.no_grad():
        for got, feat in zip(backbone(x), encoder(x)):
            # fp32 accumulation order differs between implementations: tolerance relative to the scale
            assert (got - feat).abs().max() <= 1e-5 * feat.abs().max(), (got - feat).abs().max()
