"""Every sparse layer type does what its dense forward does when nothing is masked.

A sparse layer that drops a piece of its dense forward (an activation, a drop, a permute) pretrains
another network without any error or leak; with every patch visible the sparse and the dense
layer must agree exactly, on both implementations. With a mask, masked positions stay zero.
"""

import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, EffectiveSEModule, LayerNorm2d, SEModule
from timm.layers.grn import GlobalResponseNorm
from timm.layers.norm_act import GroupNorm1Act, GroupNormAct, LayerNormAct, LayerNormAct2d

from spark_det.sparse.convert import IMPLEMENTATIONS, sparsify
from spark_det.sparse.layers import SparseLayer
from spark_det.sparse.masking import ActiveMask, random_visible_mask

C = 8
# act_layer="sigmoid" where a layer has one: sigmoid(0) != 0, so a dropped (or misplaced) act shows
LAYERS = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(C),
    "BatchNormAct2d": lambda: BatchNormAct2d(C, act_layer="sigmoid"),
    "GroupNorm": lambda: nn.GroupNorm(2, C),
    "GroupNormAct": lambda: GroupNormAct(C, num_groups=2, act_layer="sigmoid"),
    "GroupNorm1Act": lambda: GroupNorm1Act(C, act_layer="sigmoid"),
    "LayerNorm2d": lambda: LayerNorm2d(C),
    "LayerNormAct2d": lambda: LayerNormAct2d(C, act_layer="sigmoid"),
    "SEModule": lambda: SEModule(C, rd_ratio=0.5),
    "EffectiveSEModule": lambda: EffectiveSEModule(C),
    "GlobalResponseNorm": lambda: GlobalResponseNorm(C, channels_last=False),
    "Conv2d": lambda: nn.Conv2d(C, C, 3, padding=1),
    "MaxPool2d": lambda: nn.MaxPool2d(3, 1, 1),
}
CHANNELS_LAST_LAYERS = {
    "LayerNorm": lambda: nn.LayerNorm(C),
    "LayerNormAct": lambda: LayerNormAct(C, act_layer="sigmoid"),
    "Linear": lambda: nn.Linear(C, C),
}


def _randomised(layer):
    torch.manual_seed(0)
    for p in layer.parameters():
        nn.init.normal_(p, 0.2, 0.5)
    return layer


def _sparse_and_dense(make):
    dense = _randomised(make()).train()
    sparse_of = {}
    for impl in IMPLEMENTATIONS:
        active = ActiveMask()
        sparse_of[impl] = (sparsify(nn.Sequential(copy.deepcopy(dense)), active, impl=impl), active)
    return dense, sparse_of


@pytest.mark.parametrize("name", sorted(LAYERS) + sorted(CHANNELS_LAST_LAYERS))
def test_with_every_patch_visible_a_sparse_layer_is_its_dense_forward(name):
    channels_last = name in CHANNELS_LAST_LAYERS
    dense, sparse_of = _sparse_and_dense({**LAYERS, **CHANNELS_LAST_LAYERS}[name])
    x = torch.randn(2, C, 8, 8) * 2 + 0.5
    if channels_last:
        x = x.permute(0, 2, 3, 1)
    expected = dense(x)
    for impl, (sparse, active) in sparse_of.items():
        assert isinstance(sparse[0], SparseLayer), f"{name} was not converted ({impl})"
        with active.use(torch.ones(2, 1, 2, 2, dtype=torch.bool)):
            torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5, msg=f"{name}, {impl} path")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_masked_positions_stay_zero(name):
    _, sparse_of = _sparse_and_dense(LAYERS[name])
    visible = random_visible_mask(2, (2, 2), 0.5, torch.Generator().manual_seed(1))
    mask = visible.repeat_interleave(4, 2).repeat_interleave(4, 3)
    x = torch.randn(2, C, 8, 8) * mask
    for impl, (sparse, active) in sparse_of.items():
        with active.use(visible):
            out = sparse(x)
        assert out.masked_select(~mask).abs().max() == 0, f"{name}, {impl} path"
