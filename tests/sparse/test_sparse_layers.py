"""Sparse layers compute what the gathered-visible-vectors definition says they compute."""

import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from ports import free_port
from timm.layers import LayerNorm2d, SEModule

from spark_det.model.encoder import SparseEncoder
from spark_det.sparse.convert import UnsupportedLayerError, enable_sparse_sync_batchnorm, sparsify
from spark_det.sparse.layers import SparseLayer
from spark_det.sparse.masking import ActiveMask, random_visible_mask, upsample_mask


def _sparse_input(b=4, c=8, grid=(3, 5), scale=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    visible = random_visible_mask(b, grid, 0.6, g)
    mask = upsample_mask(visible, (grid[0] * scale, grid[1] * scale))
    x = (torch.randn(b, c, grid[0] * scale, grid[1] * scale, generator=g) * 3 + 1.5) * mask
    return x, visible, mask


def _gather(x, mask):
    """[B, C, H, W] -> [N_visible, C]: the straightforward definition of 'visible positions'."""
    return x.permute(0, 2, 3, 1)[mask[:, 0]]


def _scatter(vectors, mask, like):
    out = torch.zeros_like(like.permute(0, 2, 3, 1))
    out[mask[:, 0]] = vectors
    return out.permute(0, 3, 1, 2)


def _run_sparse(layer, x, visible):
    active = ActiveMask()
    sparse = sparsify(layer, active)
    with active.use(visible):
        return sparse(x), sparse


def test_batchnorm_statistics_come_from_visible_positions_only():
    x, visible, mask = _sparse_input()
    bn = nn.BatchNorm2d(8, momentum=0.3)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    reference = nn.BatchNorm1d(8, momentum=0.3)
    reference.load_state_dict(bn.state_dict())
    out, sparse_bn = _run_sparse(bn, x, visible)
    expected = _scatter(reference(_gather(x, mask)), mask, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_bn.running_mean, reference.running_mean)
    torch.testing.assert_close(sparse_bn.running_var, reference.running_var)
    # Statistics over all positions (masked zeros included) differ: the test can tell them apart.
    dense = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True) * mask
    assert not torch.allclose(out, dense, atol=1e-3)


def test_batchnorm_in_eval_mode_uses_running_statistics_and_keeps_masked_positions_zero():
    x, visible, mask = _sparse_input()
    bn = nn.BatchNorm2d(8).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    nn.init.normal_(bn.bias)
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps) * mask
    out, _ = _run_sparse(bn, x, visible)
    torch.testing.assert_close(out, expected)


def test_groupnorm_statistics_come_from_each_samples_visible_positions():
    x, visible, mask = _sparse_input(c=8)
    gn = nn.GroupNorm(4, 8)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    out, _ = _run_sparse(gn, x, visible)
    for i in range(x.shape[0]):
        vecs = _gather(x[i : i + 1], mask[i : i + 1])  # [N_i, C]
        groups = vecs.view(-1, 4, 2)
        mean = groups.mean(dim=(0, 2), keepdim=True)
        var = groups.var(dim=(0, 2), unbiased=False, keepdim=True)
        normed = ((groups - mean) / torch.sqrt(var + gn.eps)).view(-1, 8) * gn.weight + gn.bias
        torch.testing.assert_close(out[i : i + 1], _scatter(normed, mask[i : i + 1], x[i : i + 1]))


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_layernorm_normalises_visible_positions_and_leaves_masked_ones_empty(layout):
    x, visible, mask = _sparse_input()
    if layout == "channels_first":
        ln = LayerNorm2d(8)
        nn.init.normal_(ln.bias)
        out, _ = _run_sparse(ln, x, visible)
        expected = _scatter(F.layer_norm(_gather(x, mask), (8,), ln.weight, ln.bias, ln.eps), mask, x)
    else:
        ln = nn.LayerNorm(8)
        nn.init.normal_(ln.bias)
        out, _ = _run_sparse(ln, x.permute(0, 2, 3, 1), visible)
        out = out.permute(0, 3, 1, 2)
        expected = _scatter(F.layer_norm(_gather(x, mask), (8,), ln.weight, ln.bias, ln.eps), mask, x)
    torch.testing.assert_close(out, expected)


def test_squeeze_excitation_pools_visible_positions_only():
    x, visible, mask = _sparse_input(c=16)
    se = SEModule(16, rd_ratio=0.25)
    out, _ = _run_sparse(se, x, visible)
    pooled = torch.stack([_gather(x[i : i + 1], mask[i : i + 1]).mean(0) for i in range(x.shape[0])])
    gate = se.gate(se.fc2(se.act(se.fc1(pooled[:, :, None, None]))))
    torch.testing.assert_close(out, x * gate)


def test_a_layer_without_sparse_version_is_refused_by_name():
    class Shift(nn.Module):  # moves information between positions
        def forward(self, x):
            return x.roll(1, dims=-1)

    model = timm.create_model("resnet18", num_classes=0, global_pool="")
    model.layer2[0].act1 = Shift()
    with pytest.raises(UnsupportedLayerError, match=r"layer2\.0\.act1.*Shift"):
        SparseEncoder(model)


def test_a_container_that_fills_masked_positions_is_caught_by_the_probe():
    class AddBias(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 1.0

    model = timm.create_model("resnet18", num_classes=0, global_pool="")
    model.layer1[0].conv1 = AddBias(model.layer1[0].conv1)  # a container around a convolution
    with pytest.raises(ValueError, match=r"layer '.*layer1\.0\.bn1' receives non-zero values at masked"):
        SparseEncoder(model, impl="reference")  # (the fast path runs the whole block on visible rows)
    # made only of activations around its own code, the same container acts per position: it is re-masked
    model = timm.create_model("resnet18", num_classes=0, global_pool="")
    model.layer1[0].act1 = AddBias(nn.ReLU())
    assert isinstance(SparseEncoder(model).model.layer1[0].act1, SparseLayer)


def test_sparse_layer_called_outside_an_encoder_forward_raises_clearly():
    encoder = SparseEncoder("resnet18")
    with pytest.raises(RuntimeError, match="without a mask"):
        encoder.model.conv1(torch.randn(1, 3, 64, 64))


def test_two_encoders_in_one_process_keep_their_own_masks():
    a, b = SparseEncoder("resnet18").eval(), SparseEncoder("resnet18").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    va = random_visible_mask(2, (2, 2), 0.5, torch.Generator().manual_seed(0))
    vb = ~va
    alone_a, alone_b = a(x, va), b(x, vb)

    # b runs *inside* a's forward (a hook on a's first layer): each must still use its own mask.
    inner = {}

    def run_b_inside_a(*_):
        inner["b"] = b(x, vb)

    handle = a.model.layer1.register_forward_hook(run_b_inside_a)
    nested_a = a(x, va)
    handle.remove()
    for fa, fn in zip(alone_a, nested_a):
        torch.testing.assert_close(fa, fn)
    for fb, fn in zip(alone_b, inner["b"]):
        torch.testing.assert_close(fb, fn)


def _sync_bn_worker(rank, world, port, x, visible, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(x.shape[1])
        active = ActiveMask()
        sparse = sparsify(bn, active)
        assert enable_sparse_sync_batchnorm(sparse) == 1
        shard = slice(rank * 2, rank * 2 + 2)
        xi = x[shard].clone().requires_grad_(True)
        with active.use(visible[shard]):
            out = sparse(xi)
        (out * torch.arange(out.numel()).view_as(out).float().sin()[:]).sum().backward()
        result[rank] = (out.detach(), xi.grad, sparse.running_mean.clone(), sparse.running_var.clone())
    finally:
        dist.destroy_process_group()


def test_sparse_sync_batchnorm_across_two_gloo_processes_equals_one_process_on_the_whole_batch():
    x, visible, mask = _sparse_input(b=4)
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    full_x = x.clone().requires_grad_(True)
    full_out, single = _run_sparse(bn, full_x, visible)
    weights = torch.cat([torch.arange(full_out[i * 2 : i * 2 + 2].numel()).float().sin() for i in range(2)])
    (full_out * weights.view_as(full_out)).sum().backward()

    with mp.Manager() as manager:
        result = manager.dict()
        port = free_port()
        mp.spawn(_sync_bn_worker, args=(2, port, x, visible, result), nprocs=2, join=True)
        outs = [result[r] for r in range(2)]
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), full_out.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([o[1] for o in outs]), full_x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outs[0][2], single.running_mean)
    torch.testing.assert_close(outs[1][3], single.running_var)
