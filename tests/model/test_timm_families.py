"""Any timm CNN: sparse and leak-free on both implementations, or refused naming a layer.

For each model, with every parameter and buffer randomised as training would leave them (zero-initialised
last layers, gates and layer scales would hide a leak): (a) features at visible positions and every
BatchNorm statistic do not depend on masked patches, nor do pooled values on whether any patch is
masked: the same image with more masked patches appended (on the right) gives the same
features on the common part and the same running statistics. Changing pixels inside masked
patches would not test this (the encoder zeroes masked pixels before the first layer); adding
masked positions changes every statistic that counts them (a dense mean, BatchNorm or squeeze
averages over more zeros). (b) Masked positions are exactly zero. (c) With every patch visible
the features equal the dense timm model's. The last test shows (a) failing on a leaking model.
"""

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from spark_det.model.encoder import SparseEncoder
from spark_det.model.leak_probe import find_leak, randomise_like_training, same_on_common_part
from spark_det.sparse.convert import UnsupportedLayerError, sparsify
from spark_det.sparse.masking import upsample_mask

pytestmark = pytest.mark.slow

# model -> None (supported) or the layer the refusal must name
TESTED = {
    "resnet18": None, "resnet26d": None, "seresnext26d_32x4d": None, "res2net50_14w_8s": None,
    "resnest14d": None, "skresnet18": None, "ecaresnet26t": None, "resnetblur18": None,
    "gcresnext26ts": None, "resnetv2_50d_gn": None, "resnetv2_50d_frn": None, "resnetv2_50d_evos": None,
    "regnetx_002": None, "regnety_002": None, "regnetz_005": None, "cs3darknet_s": None, "dla34": None,
    "dpn48b": None, "repvgg_a0": None, "mobileone_s0": None, "densenet121": None,
    "ese_vovnet19b_slim_dw": None, "efficientnet_b0": None, "tf_efficientnet_b0": None,
    "mobilenetv3_small_100": None, "mobilenetv4_conv_small": None, "mixnet_s": None, "rexnet_100": None,
    "lcnet_050": None, "ghostnet_100": None, "fastvit_t8": None, "poolformerv2_s12": None,
    "convnext_atto": None, "convnextv2_atto": None,
    "lambda_resnet26t": r"stages\.2\.1\.self_attn\.conv_lambda.*Conv3d",
    "hrnet_w18_small": r"stage2\.0\.fuse_layers\.0\.1\.2.*Upsample",
    "hgnetv2_b0": r"layer 'stem' \(timm\.models\.hgnet\.StemV2\) computes 'pad'",  # it pads the map
}
IMPLS = ("fast", "reference")
FLOAT32_INSIDE = {"resnetv2_50d_frn", "resnetv2_50d_evos"}  # their norms compute in float32 even in float64


def _images_and_mask(encoder):
    r = encoder.downsample_ratio
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 2 * r, 2 * r, generator=generator, dtype=torch.float64)
    visible = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool).view(2, 1, 2, 2)
    return images, visible


def _statistics(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def leaks(encoder: SparseEncoder) -> list[str]:
    """What in ``encoder`` depends on masked patches: a list of findings (empty when leak-free)."""
    probe = copy.deepcopy(encoder).double().train()
    randomise_like_training(probe, torch.Generator().manual_seed(1))  # every weight, as training leaves them
    for module in probe.modules():
        if isinstance(module, (nn.Dropout, timm.layers.DropPath)):
            module.eval()
    start = copy.deepcopy(probe.state_dict())
    images, visible = _images_and_mask(encoder)
    r = encoder.downsample_ratio
    runs = []
    for extra in (1, 2):  # one and two images' width of masked patches appended
        probe.load_state_dict(start)
        with torch.no_grad():
            feats = probe(F.pad(images, (0, extra * 2 * r)), F.pad(visible, (0, extra * 2)))
        runs.append((feats, _statistics(probe)))
    (once, stats_once), (twice, stats_twice) = runs
    findings = [f"scale {i}: visible features change" for i, (a, b) in enumerate(zip(once, twice))
                if not same_on_common_part(a, b)]
    findings += [f"{k}: statistic changes" for k in stats_once
                 if not torch.allclose(stats_once[k], stats_twice[k], rtol=1e-4, atol=1e-7)]
    for i, f in enumerate(once):
        masked = ~upsample_mask(F.pad(visible, (0, 2)), f.shape[-2:])
        if f.masked_select(masked).abs().max() > 0:
            findings.append(f"scale {i}: masked positions are not zero")
    finding = find_leak(encoder, randomise=True, seed=2)  # with it: a max or min over positions counting zeros
    return findings + ([finding] if finding else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(TESTED))
def test_a_timm_family_is_sparse_and_leak_free_or_refused_by_layer(name, impl):
    refusal = TESTED[name]
    if refusal is not None:
        with pytest.raises(UnsupportedLayerError, match=refusal):
            SparseEncoder(name, impl=impl)
        return
    encoder = SparseEncoder(name, impl=impl, verify=False)  # the test does the checking itself
    assert leaks(encoder) == []
    # (c) every patch visible: the dense timm model, in eval mode, with the same weights
    dense = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    dense.load_state_dict(encoder.dense_state_dict())
    dense.double().eval()
    encoder.double().eval()
    x = torch.randn(2, 3, 2 * encoder.downsample_ratio, 4 * encoder.downsample_ratio, dtype=torch.float64)
    with torch.no_grad():  # float64, so that a tight tolerance is not at the mercy of summation order
        expected = dense.forward_intermediates(x, indices=4, intermediates_only=True)
        tolerance = 1e-4 if name in FLOAT32_INSIDE else 1e-5
        for s, d in zip(encoder(x), expected):
            torch.testing.assert_close(s, d, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name,impl,path,dense_type", [
    ("efficientnet_b0", "fast", "blocks.1.0.se", None),  # squeeze-excitation left dense: averages masked zeros
    ("resnet18", "reference", "layer2.0.bn1", nn.BatchNorm2d),  # a dense BatchNorm: counts masked positions
])
def test_the_leak_test_fails_on_a_leaking_model(name, impl, path, dense_type):
    encoder = SparseEncoder(name, impl=impl, verify=False)
    assert leaks(encoder) == []
    parent_name, _, child = path.rpartition(".")
    parent = encoder.model.get_submodule(parent_name)
    sparse_layer = getattr(parent, child)
    if dense_type is None:  # rebuild the module dense (its class without the sparse mixin)
        dense_cls = next(c for c in type(sparse_layer).__mro__[1:] if c.__module__.startswith("timm"))
        leaky = dense_cls.__new__(dense_cls)
        leaky.__dict__.update(sparse_layer.__dict__)
    else:
        leaky = dense_type(sparse_layer.num_features)
        leaky.load_state_dict(sparse_layer.state_dict())
    setattr(parent, child, leaky)
    assert leaks(encoder), f"replacing {path} by a dense {type(leaky).__name__} was not noticed"


def test_sparsify_without_a_probe_still_refuses_unknown_layers():
    class Shift(nn.Module):
        def forward(self, x):
            return x.roll(1, dims=-1)

    with pytest.raises(UnsupportedLayerError, match="Shift"):
        sparsify(nn.Sequential(nn.Conv2d(3, 3, 1), Shift()), SparseEncoder("resnet18").active)


def test_the_supported_models_page_table_is_what_the_models_say():
    from pathlib import Path

    from spark_det.model.families import END, FAMILIES, PAGE, START, table

    page = (Path(__file__).resolve().parents[2] / PAGE).read_text()
    assert page.split(START, 1)[1].split(END, 1)[0].strip() == table(), (
        f"{PAGE}'s table is stale: python -m spark_det.model.families --write {PAGE}")
    assert set(FAMILIES.values()) == set(TESTED), "every family in the table is tested above"
