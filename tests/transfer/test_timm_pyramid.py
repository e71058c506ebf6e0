"""The generic detection backbone: any SparK-supported timm CNN, loaded from a spark-det export
with every backbone tensor from the file and the encoder's features (Detectron2, MMDetection)."""

import pytest
import torch

from spark_det.errors import CheckpointError
from spark_det.io import save_atomic
from spark_det.model.encoder import SparseEncoder
from spark_det.transfer.timm_pyramid import TimmPyramid

from frameworks import assert_same_features, perturbed_encoder, require

ARCHS = ["efficientnet_b0", "regnety_002"]


def _export(arch, folder):
    encoder = perturbed_encoder(arch)
    return encoder, save_atomic(encoder.dense_state_dict(), folder / f"encoder-{arch}.pth")


def _assert_loaded_and_same_features(pyramid_model, forward, encoder, path):
    state = torch.load(path, weights_only=True)
    for name, value in pyramid_model.state_dict().items():
        assert torch.equal(value, state[name]), f"{name} was not loaded from the file"
    x = torch.randn(2, 3, 96, 128)
    encoder.eval()
    with torch.no_grad():
        assert_same_features(forward(x), encoder(x))


def _fill(module):
    with torch.no_grad():  # a tensor left at this value would not equal the file's
        for p in module.parameters():
            p.fill_(0.123)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_export_fills_every_backbone_tensor_and_gives_the_encoders_features(arch, tmp_path):
    encoder, path = _export(arch, tmp_path)
    pyramid = TimmPyramid(arch).eval()
    _fill(pyramid)
    left_out = pyramid.load_export(path)
    assert left_out == pyramid.unused  # only the layers after the last feature level (EfficientNet's conv_head)
    _assert_loaded_and_same_features(pyramid.model, pyramid.forward_pyramid, encoder, path)
    assert pyramid.strides == [4, 8, 16, 32] and pyramid.channels == encoder.channels


def test_an_export_of_another_model_is_refused_naming_both(tmp_path):
    path = save_atomic(SparseEncoder("resnet18").dense_state_dict(), tmp_path / "encoder-resnet18.pth")
    with pytest.raises(CheckpointError, match=r"does not fit the efficientnet_b0 backbone: \d+ tensors missing"):
        TimmPyramid("efficientnet_b0").load_export(path)


@pytest.mark.detectron2
@pytest.mark.parametrize("arch", ARCHS)
def test_detectron2s_timm_fpn_backbone_loads_the_export(arch, tmp_path):
    require("detectron2")
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY

    from spark_det.d2 import add_spark_config

    encoder, path = _export(arch, tmp_path)
    cfg = get_cfg()
    add_spark_config(cfg)
    cfg.MODEL.TIMM.NAME, cfg.MODEL.TIMM.WEIGHTS = arch, str(path)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # Detectron2 defaults to 2; the timm backbone refuses freezing
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    backbone = BACKBONE_REGISTRY.get("build_timm_fpn_backbone")(cfg, ShapeSpec(channels=3)).bottom_up.eval()
    names = ["res2", "res3", "res4", "res5"]
    _assert_loaded_and_same_features(backbone.model, lambda x: [backbone(x)[n] for n in names], encoder, path)
    shapes = backbone.output_shape()
    assert [shapes[n].stride for n in names] == [4, 8, 16, 32]
    assert [shapes[n].channels for n in names] == encoder.channels


@pytest.mark.mmdet
@pytest.mark.parametrize("arch", ARCHS)
def test_mmdetections_sparktimm_backbone_loads_the_export(arch, tmp_path):
    require("mmdet")
    from mmdet.registry import MODELS

    import spark_det.mmdet  # noqa: F401 (registers SparKTimm)

    encoder, path = _export(arch, tmp_path)
    backbone = MODELS.build(dict(type="SparKTimm", arch=arch, checkpoint=str(path))).eval()
    _fill(backbone)
    backbone.init_weights()
    _assert_loaded_and_same_features(backbone.model, backbone, encoder, path)


@pytest.mark.parametrize("arch", ["convnextv2_atto", "seresnet18", "convnext_atto", "resnet18"])
def test_convert_identifies_convnext_v2_and_se_resnet_exports(arch):
    from spark_det.transfer.convert import convert

    name, state, count = convert(SparseEncoder(arch).dense_state_dict(), "timm")
    assert name == arch and count == len(state)


def test_converting_a_model_the_framework_has_no_backbone_for_points_to_the_generic_one():
    from spark_det.transfer.convert import convert

    with pytest.raises(CheckpointError, match="seresnet18 needs none: the generic timm backbone loads"):
        convert(SparseEncoder("seresnet18").dense_state_dict(), "detectron2")
    with pytest.raises(CheckpointError, match="generic timm backbone loads a spark-det export directly"):
        convert(SparseEncoder("efficientnet_b0").dense_state_dict(), "mmdet")


def test_a_convnext_v2_export_converts_into_the_convnext_backbones(tmp_path):
    from spark_det.transfer.convert import convert
    from spark_det.transfer.convnext_pyramid import ConvNeXtPyramid

    encoder = perturbed_encoder("convnextv2_atto")
    name, ckpt, _ = convert(encoder.dense_state_dict(), "mmdet")
    pyramid = ConvNeXtPyramid(name).eval()
    pyramid.load_state_dict(ckpt["state_dict"], strict=True)
    x = torch.randn(1, 3, 64, 96)
    encoder.eval()
    with torch.no_grad():
        assert_same_features(pyramid.forward_pyramid(x), encoder(x))
