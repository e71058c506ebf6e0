"""The SparK model: densify, decoder shapes, the masked loss, reconstruction, learning."""

import pytest
import torch

from spark_det.model.encoder import SparseEncoder
from spark_det.model.registry import create_spark
from spark_det.model.spark import SparK, patchify, unpatchify


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return SparK(SparseEncoder("resnet18"), decoder_width=64)


def test_decoder_reconstructs_at_input_resolution_for_non_square_inputs(tiny):
    for hw in [(64, 96), (128, 608)]:
        x = torch.randn(2, 3, *hw)
        visible = tiny.random_mask(x)
        assert tiny.predict(x, visible).shape == x.shape


def test_patchify_round_trips():
    x = torch.randn(2, 3, 64, 96)
    assert torch.equal(unpatchify(patchify(x, 32), 32, (2, 3)), x)


def test_loss_ignores_predictions_on_visible_patches(tiny):
    x = torch.randn(2, 3, 64, 96)
    visible = tiny.random_mask(x, torch.Generator().manual_seed(0))
    pred = torch.randn_like(x)
    keep = visible.repeat_interleave(32, 2).repeat_interleave(32, 3).expand_as(x)
    pred_other = torch.where(keep, torch.randn_like(x) * 5, pred)
    pred_masked_changed = torch.where(keep, pred, torch.randn_like(x) * 5)
    loss = tiny.loss(x, pred, visible)
    assert torch.equal(loss, tiny.loss(x, pred_other, visible))
    assert not torch.equal(loss, tiny.loss(x, pred_masked_changed, visible))


def test_loss_targets_are_per_patch_normalised(tiny):
    x = torch.randn(1, 3, 64, 64) * 4 + 2
    target, mean, std = tiny.targets(x)
    torch.testing.assert_close(target.mean(-1), torch.zeros(1, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(-1), torch.ones(1, 4), atol=1e-3, rtol=0)
    # A perfect prediction of the normalised masked patches gives zero loss.
    visible = torch.tensor([True, False, False, True]).view(1, 1, 2, 2)
    assert tiny.loss(x, unpatchify(target, 32, (2, 2)), visible) < 1e-10


def test_mask_tokens_fill_masked_positions_before_the_decoder(tiny):
    x = torch.randn(2, 3, 64, 64)
    visible = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool).view(2, 1, 2, 2)
    tiny.eval()
    with torch.no_grad():
        coarse = tiny.densify(tiny.encoder(x, visible), visible)[0]
    tiny.train()
    token = tiny.densify_projs[0](tiny.mask_tokens[0]).flatten()
    torch.testing.assert_close(coarse[0, :, 0, 1], token)
    assert not torch.allclose(coarse[0, :, 0, 0], token)


def test_reconstruction_keeps_visible_pixels_and_predicts_masked_ones(tiny):
    x = torch.randn(2, 3, 64, 96)
    out = tiny.reconstruct(x, generator=torch.Generator().manual_seed(0))
    keep = out["visible"].repeat_interleave(32, 2).repeat_interleave(32, 3).expand_as(x)
    assert set(out) == {"input", "masked", "reconstruction", "visible"}
    assert torch.equal(out["reconstruction"][keep], x[keep])
    assert torch.equal(out["masked"][~keep], torch.zeros_like(x[~keep]))
    assert not torch.allclose(out["reconstruction"][~keep], x[~keep])


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_loss_decreases_when_overfitting_a_handful_of_images(name):
    torch.manual_seed(0)
    model = create_spark(name, decoder_width=64)
    images = torch.randn(4, 1, 8, 8).repeat_interleave(8, 2).repeat_interleave(8, 3).expand(4, 3, 64, 64)
    images = images + 0.1 * torch.randn(4, 3, 64, 64)
    masks = [model.random_mask(images, torch.Generator().manual_seed(i)) for i in range(4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        loss = model(images, masks[step % 4])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, (first, last)


def test_densify_norm_follows_the_encoder_family():
    assert create_spark("resnet18", decoder_width=64).densify_norm == "bn"
    assert create_spark("convnext_atto", decoder_width=64).densify_norm == "ln"
