"""SparK ConvNeXt encoders become MMDetection backbones that its own layer-decay constructor understands."""

import pytest
import torch

from frameworks import (
    assert_every_tensor_from_file,
    assert_same_features,
    convert_encoder,
    perturbed_encoder,
    require,
)

require("mmdet")


@pytest.mark.parametrize("arch", ["convnext_atto", "convnext_tiny"])
def test_mmdet_convnext_loads_every_tensor_and_reproduces_the_encoder(tmp_path, arch):
    from mmdet.registry import MODELS

    import spark_det.mmdet  # noqa: F401  (what custom_imports does: registers SparKConvNeXt)

    encoder = perturbed_encoder(arch)
    dst = convert_encoder(encoder, tmp_path, "mmdet")

    init_cfg = dict(type="Pretrained", checkpoint=str(dst))
    backbone = MODELS.build(dict(type="SparKConvNeXt", arch=arch, init_cfg=init_cfg))
    for p in backbone.parameters():
        torch.nn.init.constant_(p, 0.123)
    backbone.init_weights()
    backbone.eval()
    assert_every_tensor_from_file(backbone.state_dict(), torch.load(dst, weights_only=True)["state_dict"])

    x = torch.randn(2, 3, 96, 128)
    encoder.eval()
    with torch.no_grad():
        assert_same_features(backbone(x), encoder(x))


def test_mmdetections_layer_decay_constructor_assigns_convnext_layer_ids():
    from mmdet.engine.optimizers import LearningRateDecayOptimizerConstructor
    from mmdet.registry import MODELS

    import spark_det.mmdet  # noqa: F401

    class Detector(torch.nn.Module):  # the constructor reads model.backbone and names "backbone.*"
        def __init__(self):
            super().__init__()
            self.backbone = MODELS.build(dict(type="SparKConvNeXt", arch="convnext_atto"))
            self.neck = torch.nn.Conv2d(320, 8, 1)

    model = Detector()
    constructor = LearningRateDecayOptimizerConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1.0, weight_decay=0.05)),
        dict(decay_rate=0.5, decay_type="layer_wise", num_layers=6),
    )
    optimizer = constructor(model).optimizer
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    # ids: stem 0, stage 1 -> 1, stage 2 -> 2, stage 3 block b -> 3 + b // 3, stage 4 -> 6, rest 7 (of 8)
    assert lr_of[id(params["backbone.downsample_layers.0.0.weight"])] == pytest.approx(0.5**7)
    assert lr_of[id(params["backbone.stages.0.1.conv_dw.weight"])] == pytest.approx(0.5**6)
    assert lr_of[id(params["backbone.stages.2.4.mlp.fc1.weight"])] == pytest.approx(0.5**3)
    assert lr_of[id(params["backbone.stages.3.1.mlp.fc2.weight"])] == pytest.approx(0.5**1)
    assert lr_of[id(params["neck.weight"])] == pytest.approx(1.0)


def _trainable_by_stage(backbone) -> list[tuple[bool, bool]]:
    """(downsampling layer trainable, stage trainable) for each of the 4 stages."""
    def trainable(module):
        return any(p.requires_grad for p in module.parameters())

    return [(trainable(d), trainable(s)) for d, s in zip(backbone.downsample_layers, backbone.stages)]


@pytest.mark.parametrize("frozen_stages,expected_frozen", [(-1, 0), (0, 0), (1, 1), (2, 2), (4, 4)])
def test_frozen_stages_follows_mmdetections_convnext(frozen_stages, expected_frozen):
    """mmpretrain's ConvNeXt: frozen_stages=k freezes stages 0..k-1 with their downsampling layers
    (the stem in front of stage 0)."""
    from mmdet.registry import MODELS

    import spark_det.mmdet  # noqa: F401

    backbone = MODELS.build(dict(type="SparKConvNeXt", arch="convnext_atto", frozen_stages=frozen_stages))
    expected = [(i >= expected_frozen, i >= expected_frozen) for i in range(4)]
    assert _trainable_by_stage(backbone) == expected


def test_the_weights_only_loader_is_opt_in():
    import subprocess
    import sys

    code = """
from mmengine.runner.checkpoint import CheckpointLoader
before = dict(CheckpointLoader._schemes)
import spark_det.mmdet
assert CheckpointLoader._schemes == before, "importing spark_det.mmdet changed mmengine's loaders"
import spark_det.mmdet.weights_only
from spark_det.mmdet.checkpoint import load_local_checkpoint_weights_only
assert CheckpointLoader._schemes[""] is load_local_checkpoint_weights_only
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
