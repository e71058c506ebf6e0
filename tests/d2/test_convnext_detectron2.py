"""SparK ConvNeXt encoders become Detectron2 backbones (registered by importing spark_det.d2)."""

from pathlib import Path

import pytest
import torch

from frameworks import (
    assert_every_tensor_from_file,
    assert_same_features,
    convert_encoder,
    load_into_detectron2,
    perturbed_encoder,
    require,
)

require("detectron2")


def _cfg(arch):
    from detectron2.config import get_cfg

    from spark_det.d2 import add_spark_config

    cfg = get_cfg()
    add_spark_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_convnext_fpn_backbone"
    cfg.MODEL.CONVNEXT.NAME = arch
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    return cfg


@pytest.mark.parametrize("arch", ["convnext_atto", "convnext_tiny"])
def test_detectron2_convnext_loads_every_tensor_and_reproduces_the_encoder(tmp_path, arch):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY

    encoder = perturbed_encoder(arch)
    converted_file = convert_encoder(encoder, tmp_path, "detectron2")

    cfg = _cfg(arch)  # imports spark_det.d2, which registers the backbones
    fpn = BACKBONE_REGISTRY.get("build_convnext_fpn_backbone")(cfg, ShapeSpec(channels=3))
    backbone = fpn.bottom_up.eval()
    for p in backbone.parameters():  # make "left at init" detectable
        torch.nn.init.constant_(p, 0.123)

    converted = load_into_detectron2(backbone, converted_file)
    assert_every_tensor_from_file(backbone.state_dict(), converted)

    x = torch.randn(2, 3, 96, 128)
    encoder.eval()
    with torch.no_grad():
        got = backbone(x)
        assert_same_features([got[n] for n in ["res2", "res3", "res4", "res5"]], encoder(x))
    shapes = backbone.output_shape()
    assert [shapes[n].stride for n in ["res2", "res3", "res4", "res5"]] == [4, 8, 16, 32]
    assert [shapes[n].channels for n in ["res2", "res3", "res4", "res5"]] == encoder.channels


def test_convnext_layer_ids_follow_mmdetections_rule():
    from spark_det.d2 import convnext_layer_id

    # ConvNeXt-B: 27 blocks in stage 3 -> N = 12 (the paper's num_layers), 14 ids in all
    assert convnext_layer_id("backbone.bottom_up.downsample_layers.0.0.weight", 27) == (0, 14)
    assert convnext_layer_id("backbone.bottom_up.stages.0.2.conv_dw.weight", 27) == (1, 14)
    assert convnext_layer_id("backbone.bottom_up.downsample_layers.1.1.weight", 27) == (2, 14)
    assert convnext_layer_id("backbone.bottom_up.stages.1.0.gamma", 27) == (2, 14)
    assert convnext_layer_id("backbone.bottom_up.downsample_layers.2.0.weight", 27) == (3, 14)
    assert convnext_layer_id("backbone.bottom_up.stages.2.26.mlp.fc1.weight", 27) == (11, 14)
    assert convnext_layer_id("backbone.bottom_up.stages.3.1.norm.bias", 27) == (12, 14)
    assert convnext_layer_id("backbone.bottom_up.downsample_layers.3.1.weight", 27) == (12, 14)
    assert convnext_layer_id("backbone.fpn_lateral2.weight", 27) == (13, 14)
    assert convnext_layer_id("roi_heads.box_predictor.cls_score.weight", 9) == (7, 8)  # ConvNeXt-T: N = 6


def test_layer_decay_optimizer_scales_convnext_lrs_by_depth():
    from detectron2.modeling import build_model

    from spark_det.d2 import build_layer_decay_optimizer

    cfg = _cfg("convnext_atto")
    cfg.merge_from_file(str(Path(__file__).resolve().parents[2] / "det_configs/detectron2/"
                            "mask_rcnn_convnext_base_FPN_3x_spark.yaml"))
    cfg.merge_from_list(["MODEL.CONVNEXT.NAME", "convnext_atto", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN",
                         "MODEL.FPN.NORM", "BN", "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_MASK_HEAD.NORM", "BN"])
    cfg.SOLVER.BASE_LR, cfg.SOLVER.LAYER_DECAY = 1e-3, 0.5
    model = build_model(cfg)
    opt = build_layer_decay_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    # convnext_atto: 6 blocks in stage 3 -> N = 5, ids 0..6
    assert lr_of[id(params["backbone.bottom_up.downsample_layers.0.0.weight"])] == pytest.approx(1e-3 * 0.5**6)
    assert lr_of[id(params["backbone.bottom_up.stages.2.5.mlp.fc1.weight"])] == pytest.approx(1e-3 * 0.5**2)
    assert lr_of[id(params["backbone.bottom_up.stages.3.0.mlp.fc1.weight"])] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(params["roi_heads.box_predictor.cls_score.weight"])] == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at_follows_detectron2(freeze_at):
    """MODEL.BACKBONE.FREEZE_AT: 0 nothing, 1 the stem, 2 stem + res2, k stem + res2..res{k}
    (each with its downsampling layer)."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY

    cfg = _cfg("convnext_atto")
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    bottom_up = BACKBONE_REGISTRY.get("build_convnext_backbone")(cfg, ShapeSpec(channels=3))

    def trainable(module):
        return any(p.requires_grad for p in module.parameters())

    assert trainable(bottom_up.downsample_layers[0]) == (freeze_at < 1)  # the stem
    for i, stage in enumerate(bottom_up.stages):  # res2 = stages[0], ...
        assert trainable(stage) == (freeze_at < i + 2), (freeze_at, i)
        if i > 0:
            assert trainable(bottom_up.downsample_layers[i]) == (freeze_at < i + 2)
