"""SparseEncoder: no information from masked pixels reaches any feature; export is a plain timm model."""

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d, GroupNorm, SEModule

from spark_det.model.encoder import SparseEncoder
from spark_det.model.registry import SUPPORTED_MODELS
from spark_det.sparse.convert import first_layer_fed_masked_values
from spark_det.sparse.masking import random_visible_mask, upsample_mask

# One representative per family; every SUPPORTED_MODELS entry is built in the test below.
FAMILIES = {
    "resnet18": {},  # BasicBlock
    "resnet50": {},  # Bottleneck
    "convnext_atto": {},  # LayerNorm (both layouts), Linear MLP
    "convnextv2_atto": {},  # + GlobalResponseNorm
    "seresnet18": {},  # squeeze-excitation
    "regnety_002": {},  # BatchNormAct2d + SE
    "resnet18_groupnorm": {"norm_layer": GroupNorm},
    "resnetv2_50d_gn": {},  # GroupNormAct: norm, then its activation (was silently dropped)
}


def _encoder(key):
    name = key.replace("_groupnorm", "")
    return SparseEncoder(name, **FAMILIES[key])


@pytest.mark.parametrize("key", list(FAMILIES))
def test_changing_masked_pixels_changes_no_feature_and_masked_positions_stay_zero(key):
    encoder = _encoder(key).train()  # batch statistics: the case where leaks could hide
    grid = (3, 2)
    x = torch.randn(4, 3, grid[0] * 32, grid[1] * 32)
    visible = random_visible_mask(4, grid, 0.5, torch.Generator().manual_seed(0))
    pixels = upsample_mask(visible, x.shape[-2:])
    x_other = torch.where(pixels, x, torch.randn_like(x) * 10)
    assert not torch.equal(x, x_other)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    feats = encoder(x, visible)
    encoder.load_state_dict(state)  # same running statistics for the second pass
    feats_other = encoder(x_other, visible)
    assert [f.shape[1] for f in feats] == encoder.channels
    for f, g, r in zip(feats, feats_other, encoder.reductions):
        assert f.shape[-2:] == (x.shape[-2] // r, x.shape[-1] // r)
        torch.testing.assert_close(f, g, rtol=0, atol=0)
        masked = ~upsample_mask(visible, f.shape[-2:])
        assert f.masked_select(masked).abs().max() == 0
        assert f.masked_select(~masked).abs().max() > 0


@pytest.mark.parametrize("key", list(FAMILIES))
def test_every_sparse_layer_sees_zero_at_masked_positions(key):
    encoder = _encoder(key).train()
    x = torch.randn(2, 3, 96, 64)
    visible = random_visible_mask(2, (3, 2), 0.6, torch.Generator().manual_seed(1))
    assert first_layer_fed_masked_values(encoder.model, lambda: encoder(x, visible)) is None


@pytest.mark.parametrize("key", ["resnet18", "convnext_atto", "regnety_002", "resnet18_groupnorm", "resnetv2_50d_gn"])
def test_exported_dense_timm_model_equals_sparse_encoder_with_all_patches_visible(key):
    encoder = _encoder(key)
    # Non-trivial statistics, so that a mix-up of running stats would show.
    encoder.train()
    with torch.no_grad():
        for _ in range(2):
            encoder(torch.randn(4, 3, 64, 64), random_visible_mask(4, (2, 2), 0.5))
    encoder.eval()
    dense = timm.create_model(encoder.model_name, num_classes=0, **{k: v for k, v in FAMILIES[key].items()})
    dense.load_state_dict(encoder.dense_state_dict(), strict=True)
    dense.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        sparse_feats = encoder(x)  # visible=None: every patch visible
        dense_feats = dense.forward_intermediates(x, indices=4, intermediates_only=True)
    atol = 1e-4 if key == "resnetv2_50d_gn" else 1e-5  # 50 layers of visible-position GroupNorm in fp32
    for s, d in zip(sparse_feats, dense_feats):
        torch.testing.assert_close(s, d, rtol=1e-4, atol=atol)


def test_exported_state_dict_has_plain_timm_names():
    encoder = SparseEncoder("resnet18")
    keys = set(encoder.dense_state_dict())
    assert keys == set(timm.create_model("resnet18", num_classes=0).state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SUPPORTED_MODELS))
def test_every_supported_model_converts_and_passes_the_probe(name):
    encoder = SparseEncoder(name)  # raises on an unsupported layer or a failed probe
    assert encoder.downsample_ratio == 32
    assert encoder.reductions == [4, 8, 16, 32]


@pytest.mark.parametrize("hw", [(224, 320), (128, 608)])
def test_non_square_inputs_give_features_on_the_matching_grid(hw):
    encoder = SparseEncoder("resnet18")
    grid = encoder.grid_size(hw)
    visible = random_visible_mask(1, grid, 0.6)
    feats = encoder(torch.randn(1, 3, *hw), visible)
    assert feats[-1].shape[-2:] == grid


def test_input_sizes_off_the_patch_grid_and_wrong_masks_are_rejected():
    encoder = SparseEncoder("resnet18")
    with pytest.raises(ValueError, match="multiple of 32"):
        encoder(torch.randn(1, 3, 100, 64))
    with pytest.raises(ValueError, match="does not match"):
        encoder(torch.randn(1, 3, 64, 64), torch.ones(1, 1, 3, 3, dtype=torch.bool))


def _dense_se_like(se):
    dense = SEModule(se.fc1.in_channels, rd_channels=se.fc1.out_channels)
    dense.load_state_dict(se.state_dict())
    return dense


@pytest.mark.parametrize("arch,impl,path,make_dense", [
    ("resnet18", "fast", "bn1", lambda m: torch.nn.BatchNorm2d(m.num_features)),  # what SyncBatchNorm did
    ("resnet18", "reference", "layer3.1.bn2", lambda m: torch.nn.BatchNorm2d(m.num_features)),
    ("regnety_002", "fast", "s2.b1.conv1.bn", lambda m: BatchNormAct2d(m.num_features)),
    ("seresnet50", "reference", "layer2.1.se", _dense_se_like),  # a pooled statistic over masked zeros
])
def test_the_probe_catches_a_dense_norm_or_pooled_statistic_left_on_the_path(arch, impl, path, make_dense):
    """Freshly initialised, a dense BatchNorm maps zeros to zeros and a dense squeeze-excitation
    keeps them zero: only a probe in train mode with non-trivial statistics, and one that adds
    masked patches, can tell them from sparse layers."""
    encoder = SparseEncoder(arch, impl=impl)  # verified at construction
    parent_path, _, name = path.rpartition(".")
    parent = encoder.model.get_submodule(parent_path)
    setattr(parent, name, make_dense(getattr(parent, name)))
    with pytest.raises(ValueError, match="masked"):
        encoder.verify()
