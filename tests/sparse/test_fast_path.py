"""The fast sparse path computes what the reference emulation computes, for every supported family.

The reference path (dense layers + re-masking, norms over gathered visible vectors) is the
definition of correct; the fast path runs standard blocks on visible rows. Same weights, same
images, same mask, same stochastic-depth draws -> same features, loss, gradients and BatchNorm
running statistics. Gradients are compared in float64, where the two agree to ~1e-12: in fp32,
BatchNorm over the few visible vectors of a tiny test image amplifies summation-order rounding
(up to 1e-2 relative on some RegNet gradients at 64 px, 3e-5 at 128 px), which would hide a real
difference behind a loose tolerance. The fp32 loss is checked to 1e-5 (relative).
"""

from pathlib import Path

import pytest
import torch
from fast_path_checks import assert_same_features_loss_gradients_and_running_stats, assert_same_gradients

from spark_det.model.registry import create_spark
from spark_det.sparse.blocks import RowBasicBlock, RowBlock, RowBottleneck, RowConvNeXtBlock
from spark_det.train.config import load_recipe

# model -> (row block the fast path must use, how many), one per supported family
FAMILIES = {
    "resnet18": (RowBasicBlock, 8),
    "resnet50": (RowBottleneck, 16),
    "seresnet50": (RowBottleneck, 16),
    "convnext_atto": (RowConvNeXtBlock, 12),  # 1x1-conv MLP
    "convnext_tiny": (RowConvNeXtBlock, 18),  # Linear MLP
    "convnextv2_atto": (RowConvNeXtBlock, 12),  # GRN
    "regnety_040": (None, 0),  # no row blocks: per-layer fast path
}


def _pair(name, drop_path_rate=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    reference = create_spark(name, sparse_impl="reference", decoder_width=64, drop_path_rate=drop_path_rate)
    fast = create_spark(name, sparse_impl="fast", decoder_width=64, drop_path_rate=drop_path_rate)
    fast.load_state_dict(reference.state_dict())
    reference, fast = reference.to(dtype), fast.to(dtype)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    visible = reference.random_mask(images, torch.Generator().manual_seed(2))
    return reference, fast, images, visible


@pytest.mark.parametrize("name", FAMILIES)
def test_fast_path_matches_reference_features_loss_gradients_and_running_stats(name):
    reference, fast, images, visible = _pair(name)
    block_type, expected_blocks = FAMILIES[name]
    row_blocks = [m for m in fast.modules() if isinstance(m, RowBlock)]
    assert len(row_blocks) == expected_blocks, "a standard block silently fell back to per-layer execution"
    assert all(isinstance(m, block_type) for m in row_blocks)
    assert not any(isinstance(m, RowBlock) for m in reference.modules())

    assert_same_features_loss_gradients_and_running_stats(reference, fast, images, visible)


def _activations_saved_for_backward(model, images, visible, autocast_dtype):
    """Bytes of the distinct storages, parameters aside, autograd keeps over one pretraining forward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        model(images, visible)
    return sum(storages.values())


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "convnext_atto"])
def test_fast_path_keeps_no_more_activations_for_backward_than_the_reference(name, autocast_dtype):
    """Counted exactly (what autograd saves), not measured by an allocator; at 128 px, where the
    mask grid (4 x 4, 6 visible) keeps close to the paper's 40% of the image."""
    reference, fast, _, _ = _pair(name, dtype=torch.float32)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    visible = reference.random_mask(images, torch.Generator().manual_seed(2))
    saved = {impl: _activations_saved_for_backward(m, images, visible, autocast_dtype)
             for impl, m in (("reference", reference), ("fast", fast))}
    assert saved["fast"] <= saved["reference"], saved


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_at_the_demos_pretraining_size_the_fast_path_keeps_no_more_than_the_reference(autocast_dtype):
    """The demo's recipe (ResNet-18, batch 32 at 96 px, 3 x 3 mask grid), where the stem's
    BatchNorm and BasicBlock's strided shortcuts had kept 3.8% more on the fast path."""
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "pretrain" / "resnet18_cpu_demo.yaml")
    torch.manual_seed(0)
    models = {impl: create_spark(recipe["model"], sparse_impl=impl, decoder_width=recipe["decoder_width"])
              for impl in ("reference", "fast")}
    models["fast"].load_state_dict(models["reference"].state_dict())
    images = torch.randn(recipe["batch_size"], 3, *recipe["input_size"], generator=torch.Generator().manual_seed(1))
    visible = models["reference"].random_mask(images, torch.Generator().manual_seed(2))
    saved = {impl: _activations_saved_for_backward(m, images, visible, autocast_dtype) for impl, m in models.items()}
    assert saved["fast"] <= saved["reference"], saved


@pytest.mark.parametrize("name", ["resnet50", "convnext_atto", "regnety_040"])
def test_fp32_loss_matches_reference_to_1e_5(name):
    reference, fast, images, visible = _pair(name, dtype=torch.float32)
    with torch.no_grad():
        loss_ref, loss_fast = reference(images, visible).item(), fast(images, visible).item()
    assert abs(loss_fast - loss_ref) <= 1e-5 * abs(loss_ref)


@pytest.mark.parametrize("name", ["resnet50", "convnext_atto"])
def test_stochastic_depth_draws_the_same_samples_on_both_paths(name):
    reference, fast, images, visible = _pair(name, drop_path_rate=0.5)
    torch.manual_seed(7)
    loss_ref = reference(images, visible)
    torch.manual_seed(7)
    loss_fast = fast(images, visible)
    assert abs(loss_fast.item() - loss_ref.item()) <= 1e-10 * abs(loss_ref.item())
    loss_ref.backward()
    loss_fast.backward()
    assert_same_gradients(reference, fast)


def test_fast_path_in_eval_mode_uses_running_statistics():
    reference, fast, images, visible = _pair("resnet50")
    reference.eval()
    fast.eval()
    with torch.no_grad():
        for f_ref, f_fast in zip(reference.encoder(images, visible), fast.encoder(images, visible)):
            torch.testing.assert_close(f_fast, f_ref, rtol=1e-7, atol=1e-9 * f_ref.abs().max().item())


def test_fast_features_are_exactly_zero_at_masked_positions():
    _, fast, images, visible = _pair("resnet50")
    for feat in fast.encoder(images, visible):
        keep = torch.nn.functional.interpolate(visible.float(), size=feat.shape[-2:], mode="nearest")
        assert (feat * (1 - keep)).abs().max() == 0


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_a_known_visible_count_changes_no_loss_gradient_or_statistic(name, impl):
    """The training engine passes the mask ratio's count (static shapes for torch.compile); the
    row indices are the same, so everything else is the same, bit for bit."""
    reference, fast, images, visible = _pair(name)
    model = fast if impl == "fast" else reference
    twin = create_spark(name, sparse_impl=impl, decoder_width=64).to(torch.float64)
    twin.load_state_dict(model.state_dict())
    loss, twin_loss = model(images, visible), twin(images, visible, per_image=twin.visible_per_image(images))
    assert torch.equal(loss, twin_loss)
    loss.backward()
    twin_loss.backward()
    for (key, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), key
    for (key, b), c in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(b, c), key
