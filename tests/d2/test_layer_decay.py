"""Layer-wise lr decay ids follow the paper for every ResNet depth (no overflow for R152/R200)."""

import pytest

from frameworks import require

require("detectron2")


@pytest.mark.parametrize("res4_blocks,expected_n", [(2, 4), (6, 5), (23, 11), (36, 15)])
def test_layer_ids_are_monotonic_and_bounded(res4_blocks, expected_n):
    from spark_det.d2.optim import resnet_layer_id

    def lid(name):
        return resnet_layer_id(name, res4_blocks)

    n = expected_n
    assert lid("backbone.bottom_up.stem.conv1.weight") == (0, n + 2)
    assert lid("backbone.bottom_up.res2.0.conv1.weight")[0] == 1
    assert lid("backbone.bottom_up.res3.3.conv2.weight")[0] == 2
    res4 = [lid(f"backbone.bottom_up.res4.{b}.conv1.weight")[0] for b in range(res4_blocks)]
    assert res4[0] == 3 and res4 == sorted(res4) and max(res4) == n - 1  # 3 + b // 3, below res5
    assert lid("backbone.bottom_up.res5.2.conv3.weight")[0] == n
    assert lid("backbone.fpn_lateral2.weight")[0] == n + 1
    assert lid("roi_heads.box_predictor.cls_score.weight")[0] == n + 1


def test_optimizer_scales_lr_by_decay_power_of_distance_to_the_heads():
    import torch
    from detectron2.config import get_cfg

    from spark_det.d2 import add_spark_config, build_layer_decay_optimizer

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.bottom_up = torch.nn.Module()
            self.backbone.bottom_up.stem = torch.nn.Conv2d(1, 1, 1)
            self.backbone.bottom_up.res4 = torch.nn.ModuleList(torch.nn.Conv2d(1, 1, 1) for _ in range(6))
            self.head = torch.nn.Linear(1, 1)

    cfg = get_cfg()
    add_spark_config(cfg)
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.LAYER_DECAY = "AdamW", 1.0, 0.5
    optimizer = build_layer_decay_optimizer(cfg, Toy())
    lrs = {(g["layer_id"], g["weight_decay"] == 0): g["lr"] for g in optimizer.param_groups}
    n = 5  # 6 res4 blocks
    assert lrs[(n + 1, False)] == 1.0  # heads: full lr
    assert lrs[(0, False)] == 0.5 ** (n + 1)  # stem
    assert lrs[(3, False)] == 0.5 ** (n - 2) and lrs[(4, False)] == 0.5 ** (n - 3)
    assert all(g["weight_decay"] == 0 for g in optimizer.param_groups if g["params"][0].ndim <= 1)


@pytest.mark.parametrize("optimizer_name", ["AdamW", "SGD"])
def test_solver_clip_gradients_is_honoured(optimizer_name):
    import torch
    from detectron2.config import get_cfg

    from spark_det.d2 import add_spark_config, build_layer_decay_optimizer

    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.bottom_up = torch.nn.Module()
    model.backbone.bottom_up.stem = torch.nn.Conv2d(2, 2, 1)
    cfg = get_cfg()
    add_spark_config(cfg)
    cfg.SOLVER.OPTIMIZER = optimizer_name
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = "value", 1e-3
    optimizer = build_layer_decay_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)
    optimizer.step()
    assert all(p.grad.abs().max() <= 1e-3 for p in model.parameters())  # clipped before the step
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = build_layer_decay_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)
    optimizer.step()
    assert all(p.grad.abs().min() == 100.0 for p in model.parameters())


@pytest.mark.parametrize("arch", ["efficientnet_b3", "regnety_040", "resnet18"])
def test_the_generic_timm_backbone_decays_by_its_feature_info_stages(arch):
    """At the Base config's LAYER_DECAY 0.6: stem 0.6^5, pyramid level k (the module timm's
    feature_info names, strides 4..32) 0.6^(5-k), the heads 1 (not ResNet's rule, which left every
    EfficientNet parameter at 1 and decayed only RegNet's stem)."""
    import torch
    from detectron2.config import get_cfg

    from spark_det.d2 import add_spark_config, build_layer_decay_optimizer
    from spark_det.d2.timm_backbone import TimmBackbone

    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.bottom_up = TimmBackbone(arch)
    model.roi_heads = torch.nn.Linear(2, 2)
    cfg = get_cfg()
    add_spark_config(cfg)
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.LAYER_DECAY = "AdamW", 1.0, 0.6
    scale = {id(p): g["lr"] for g in build_layer_decay_optimizer(cfg, model).param_groups for p in g["params"]}
    timm_model = model.backbone.bottom_up.model
    levels = [info["module"] for info in timm_model.feature_info[-4:]]
    expected = {}
    for name, _ in timm_model.named_parameters():
        level = next((k + 1 for k, module in enumerate(levels) if name.startswith(module + ".")), None)
        if level is not None:
            expected[name] = 0.6 ** (5 - level)
    stem = next(iter(dict(timm_model.named_parameters())))  # conv_stem / stem.conv / conv1
    expected[stem] = 0.6 ** 5
    if arch == "efficientnet_b3":  # the blocks between the named ones: stride 2 with the stem, 16 and 32 with theirs
        expected.update({"blocks.0.0.conv_dw.weight": 0.6 ** 5, "blocks.3.0.conv_pw.weight": 0.6 ** 2,
                         "blocks.5.0.conv_pw.weight": 0.6 ** 1})
    params = dict(timm_model.named_parameters())
    for name, lr in expected.items():
        assert scale[id(params[name])] == pytest.approx(lr), name
    assert all(scale[id(p)] == 1.0 for p in model.roi_heads.parameters())
    assert len(set(expected.values())) == 5  # five depths, every pyramid level and the stem
