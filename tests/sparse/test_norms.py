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
    assert count.dtype == torch.float64 and count.item() == 16 * 112 * 112  # exact
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


def test_counts_beyond_float32s_exact_integers_stay_exact():
    """2**24 + 1 visible positions (a ResNet stem summed over many GPUs) is not a float32."""
    x = torch.zeros(1, 1, 1, 2**24 + 1)
    _, _, count = norms.visible_moments(x, torch.ones_like(x), (0, 2, 3))
    assert count.item() == 2**24 + 1
    _, _, count = norms.visible_moments(x, None, (0, 2, 3))
    assert count.item() == 2**24 + 1


def test_the_row_path_and_the_masked_map_path_give_the_same_batchnorm():
    x, mask, _ = _masked_input(torch.float64, b=3, c=5, side=32, ratio=0.5)
    rows = x.permute(0, 2, 3, 1)[mask[:, 0].bool()]
    bn_map, bn_rows = nn.BatchNorm2d(5).double(), nn.BatchNorm2d(5).double()
    out_map = norms.sparse_batch_norm(x, mask, bn_map)
    out_rows = norms.batch_norm_rows(rows, bn_rows)
    torch.testing.assert_close(out_map.permute(0, 2, 3, 1)[mask[:, 0].bool()], out_rows)
    torch.testing.assert_close(bn_map.running_var, bn_rows.running_var)
    reference = nn.BatchNorm1d(5).double()
    torch.testing.assert_close(out_rows, reference(rows))  # and both are torch's BatchNorm on the rows
    torch.testing.assert_close(bn_rows.running_var, reference.running_var)
