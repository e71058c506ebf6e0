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


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``run()`` builds its graph."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


@pytest.mark.parametrize("masked", [False, True], ids=["rows", "masked map"])
def test_batchnorm_gradients_equal_torchs_batchnorm_on_the_visible_vectors(masked):
    x, mask, _ = _masked_input(torch.float64, b=3, c=5, side=32, ratio=0.5)
    visible = mask[:, 0].bool()
    bn = nn.BatchNorm2d(5).double()
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    reference = nn.BatchNorm1d(5).double()
    reference.load_state_dict(bn.state_dict())
    rows = x.permute(0, 2, 3, 1)[visible].detach()
    upstream = torch.randn(rows.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours_in = (x if masked else rows).clone().requires_grad_(True)
    ref_in = rows.clone().requires_grad_(True)
    ours = norms.sparse_batch_norm(ours_in, mask, bn) if masked else norms.batch_norm_rows(ours_in, bn)
    ours_rows = ours.permute(0, 2, 3, 1)[visible] if masked else ours
    (ours_rows * upstream).sum().backward()
    (reference(ref_in) * upstream).sum().backward()
    grad = ours_in.grad.permute(0, 2, 3, 1)[visible] if masked else ours_in.grad
    torch.testing.assert_close(grad, ref_in.grad)
    torch.testing.assert_close(bn.weight.grad, reference.weight.grad)
    torch.testing.assert_close(bn.bias.grad, reference.bias.grad)
    if masked:  # masked positions feed nothing, so they get no gradient
        assert ours_in.grad.permute(0, 2, 3, 1)[~visible].abs().max() == 0


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_backward_passes_gradcheck(affine):
    x, mask, _ = _masked_input(torch.float64, b=2, c=3, side=16, ratio=0.5)
    bn = nn.BatchNorm2d(3, affine=affine, track_running_stats=False).double()

    def fn(inp, *_params):  # gradcheck perturbs bn's own parameters in place
        return norms.sparse_batch_norm(inp, mask, bn)

    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True), *bn.parameters()))


def test_training_batchnorm_keeps_only_its_input_for_backward():
    """Not the float32 copies autograd through the statistics would keep: under bf16 those were
    over half of a ResNet encoder's activation memory."""
    rows = torch.randn(4096, 64, dtype=torch.bfloat16, requires_grad=True)
    bn = nn.BatchNorm2d(64)
    out = None

    def run():
        nonlocal out
        out = norms.batch_norm_rows(rows, bn)

    saved = _saved_bytes(run)
    assert out.dtype == torch.bfloat16  # as torch's BatchNorm returns a bf16 input
    assert saved <= rows.numel() * rows.element_size() + 64 * 4 * 8, saved
