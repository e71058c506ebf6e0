"""What "the fast path computes what the reference computes" means, checked in float64: shared by the
CPU tests (tests/sparse/test_fast_path.py) and the CUDA tests (tests/test_cuda.py)."""

import torch


def assert_same_gradients(reference, fast) -> None:
    ref_params = dict(reference.named_parameters())
    scale = max(p.grad.abs().max() for p in ref_params.values() if p.grad is not None)
    for name, p in fast.named_parameters():
        expected = ref_params[name].grad
        assert (p.grad is None) == (expected is None), name
        if expected is not None:
            torch.testing.assert_close(p.grad, expected, rtol=1e-7, atol=1e-9 * scale, msg=name)


def assert_same_features_loss_gradients_and_running_stats(reference, fast, images, visible) -> None:
    """Both float64 SparK models, same weights: features, loss, gradients and BatchNorm running
    statistics agree to ~1e-12 there, so a tight tolerance separates a real difference from rounding."""
    for f_ref, f_fast in zip(reference.encoder(images, visible), fast.encoder(images, visible)):
        torch.testing.assert_close(f_fast, f_ref, rtol=1e-7, atol=1e-9 * f_ref.abs().max().item())
    loss_ref, loss_fast = reference(images, visible), fast(images, visible)
    assert abs(loss_fast.item() - loss_ref.item()) <= 1e-10 * abs(loss_ref.item())
    loss_ref.backward()
    loss_fast.backward()
    assert_same_gradients(reference, fast)
    ref_buffers = dict(reference.named_buffers())
    for buf_name, buf in fast.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[buf_name], rtol=1e-7, atol=1e-9, msg=buf_name)
