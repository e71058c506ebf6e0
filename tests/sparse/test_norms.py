"""One core computes every visible-position statistic, exactly, whatever the input dtype."""

import pytest
import torch
import torch.nn as nn
from timm.layers import SEModule

from spark_det.sparse import norms
from spark_det.sparse.convert import sparsify
from spark_det.sparse.masking import ActiveMask, random_visible_mask, upsample_mask


def _masked_input(dtype, b=16, c=4, side=112, ratio=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    visible = random_visible_mask(b, (side // 16, side // 16), ratio, g)
    mask = upsample_mask(visible, (side, side))
    x = (torch.randn(b, c, side, side, generator=g) * 2 + 3) * mask
    return x.to(dtype), mask.to(dtype), visible


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_counts_and_moments_stay_exact_in_half_precision(dtype):
    x, mask, _ = _masked_input(dtype)  # 16 x 112 x 112 = 200,704 visible positions: > fp16's 65504
    mean, var, count = norms.visible_moments(x, mask, (0, 2, 3))
    assert count.dtype == torch.float32 and count.item() == 16 * 112 * 112
    reference = x.double().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    torch.testing.assert_close(mean.view(-1).double(), reference.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.view(-1).double(), reference.var(0, unbiased=False), rtol=1e-3, atol=1e-3)


def test_a_half_precision_batchnorm_keeps_finite_running_statistics():
    x, _, visible = _masked_input(torch.float16)
    bn = nn.BatchNorm2d(4)
    active = ActiveMask()
    sparse = sparsify(bn, active)
    with active.use(visible):
        sparse(x)
    assert torch.isfinite(sparse.running_var).all() and torch.isfinite(sparse.running_mean).all()
    assert (sparse.running_var > 0.1).all()  # the data's variance is 4; momentum 0.1 from 1


def test_every_sparse_norm_and_the_squeeze_use_the_one_core(monkeypatch):
    calls = []
    core = norms._visible_sum_and_count

    def counting(*args, **kwargs):
        calls.append(1)
        return core(*args, **kwargs)

    monkeypatch.setattr(norms, "_visible_sum_and_count", counting)
    x, _, visible = _masked_input(torch.float32, b=2, c=8, side=32, ratio=0.5)
    for layer in (nn.BatchNorm2d(8), nn.GroupNorm(4, 8), SEModule(8, rd_ratio=0.5)):
        calls.clear()
        active = ActiveMask()
        sparse = sparsify(layer, active)
        with active.use(visible):
            sparse(x)
        assert calls, f"{type(layer).__name__} computed its statistics elsewhere"
