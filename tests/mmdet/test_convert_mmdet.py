"""Converted SparK ResNets load into MMDetection's ResNet and reproduce the encoder's features."""

import pytest
import torch

from spark_det.model.encoder import SparseEncoder

from frameworks import assert_every_tensor_from_file, assert_same_features, convert_encoder, require

require("mmdet")


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
    dst = convert_encoder(encoder, tmp_path, "mmdet")

    backbone = MODELS.build(dict(
        type="ResNet", depth=depth, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1, style="pytorch",
        norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False,
        init_cfg=dict(type="Pretrained", checkpoint=str(dst)),
    ))
    for p in backbone.parameters():
        torch.nn.init.constant_(p, 0.123)
    backbone.init_weights()
    backbone.eval()
    assert_every_tensor_from_file(backbone.state_dict(), torch.load(dst, weights_only=True)["state_dict"])

    x = torch.randn(2, 3, 96, 128)
    encoder.eval()
    with torch.no_grad():
        assert_same_features(backbone(x), encoder(x))
