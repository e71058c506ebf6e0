"""Blocks that pool over positions however they spell it: converted and leak-free, or refused by name.

Each block is spliced into a timm ResNet-18 as its attention layer (``block_args=dict(attn_layer=...)``,
named ``layer<i>.<j>.se``). A converted block must pass the leak probe with every weight randomised
(:func:`spark_det.model.leak_probe.find_leak`) on both implementations and equal the dense model
when every patch is visible; a refused one must be refused at construction, naming the block, its
class and the operation. The leak probe itself is shown failing on blocks that count masked positions.
"""

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from spark_det.model.encoder import SparseEncoder
from spark_det.model.leak_probe import find_leak, randomise_like_training
from spark_det.sparse.convert import UnsupportedLayerError
from spark_det.sparse.layers import SparseLayer
from spark_det.sparse.reductions import VisibleReductions


class Gate(nn.Module):
    """x * sigmoid(fc(statistic(x))): the shape of every squeeze-excitation; subclasses spell the statistic."""

    def __init__(self, channels: int, **_: object) -> None:  # timm passes device/dtype
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def statistic(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, 1, 1]
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(self.statistic(x)))


class AminGate(Gate):
    def statistic(self, x):
        return x.amin((2, 3), keepdim=True)


class FlattenMaxGate(Gate):
    def statistic(self, x):
        return x.flatten(2).max(-1).values[..., None, None]


class FullMaxPoolGate(Gate):
    def statistic(self, x):
        return F.max_pool2d(x, kernel_size=x.shape[-2:])


class MeanStdGate(Gate):  # CBAM / style statistics, spelled with torch.std_mean over a flattened axis
    def statistic(self, x):
        std, mean = torch.std_mean(x.reshape(x.shape[0], x.shape[1], -1), dim=-1)
        return (mean + std)[..., None, None]


class ChannelsLastMeanGate(Gate):
    def statistic(self, x):
        return x.permute(0, 2, 3, 1).mean((1, 2))[..., None, None]


class LogSumExpGate(Gate):
    def statistic(self, x):
        return torch.logsumexp(x.flatten(2), dim=2)[..., None, None]


class SoftmaxPoolGate(Gate):
    """Attention pooling: softmax over positions, then a weighted sum (global-context style)."""

    def __init__(self, channels: int, **_: object) -> None:
        super().__init__(channels)
        self.logits = nn.Conv2d(channels, 1, 1)

    def statistic(self, x):
        weights = F.softmax(self.logits(x).flatten(2), dim=-1)  # [B, 1, HW]
        return (x.flatten(2) * weights).sum(-1)[..., None, None]


class TopkGate(Gate):
    def statistic(self, x):
        return x.flatten(2).topk(2, dim=-1).values.mean(-1)[..., None, None]


class SortGate(Gate):
    def statistic(self, x):
        return x.flatten(2).sort(dim=-1).values[..., -1:, None]


class MedianGate(Gate):
    def statistic(self, x):
        return x.flatten(2).median(dim=-1).values[..., None, None]


class QuantileGate(Gate):
    def statistic(self, x):
        return torch.quantile(x.flatten(2), 0.9, dim=-1)[..., None, None]


class AllPairsAttention(nn.Module):
    """Non-local attention: every position attends to every other (a product over positions of two dense maps)."""

    def __init__(self, channels: int, **_: object) -> None:
        super().__init__()
        self.query, self.key = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        q, k = self.query(x).flatten(2), self.key(x).flatten(2)  # [B, C, HW]
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # [B, HW, HW]
        return x + (x.flatten(2) @ attn.transpose(1, 2)).view_as(x)


class LaunderedAmaxGate(Gate):
    """A maximum taken outside torch's sight (through Python lists): it would count masked zeros."""

    def statistic(self, x):
        return torch.tensor(x.tolist(), dtype=x.dtype).amax((2, 3), keepdim=True)


class NegativeOrderNormGate(Gate):
    """A norm of order -1 over positions: decided by the smallest value, which a masked zero would be."""

    def statistic(self, x):
        return x.norm(p=-1, dim=(2, 3), keepdim=True)


class ZeroNeighbours(nn.Module):
    """Marks the neighbours of exact zeros (masked positions): a per-position test with random,
    never-zero inputs would not see it."""

    def __init__(self, channels: int, **_: object) -> None:
        super().__init__()

    def forward(self, x):
        return x * (1 + F.max_pool2d((x == 0).to(x.dtype), 3, 1, 1))


class CountsMaskedMeanGate(Gate):
    """A mean spelled as a sum divided by the map's size: counts masked positions (a leak no spelling rule sees)."""

    def statistic(self, x):
        return x.sum((2, 3), keepdim=True) / (x.shape[-2] * x.shape[-1])


CONVERTED = [AminGate, FlattenMaxGate, FullMaxPoolGate, MeanStdGate, ChannelsLastMeanGate, LogSumExpGate,
             SoftmaxPoolGate]
REFUSED = {TopkGate: "topk", SortGate: "sort", MedianGate: "median", QuantileGate: "quantile",
           AllPairsAttention: "matrix product", LaunderedAmaxGate: "tolist", NegativeOrderNormGate: "norm",
           ZeroNeighbours: "not a per-position layer"}
IMPLS = ("fast", "reference")


def resnet_with(block: type) -> nn.Module:
    return timm.create_model("resnet18", num_classes=0, global_pool="", block_args=dict(attn_layer=block))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block", CONVERTED, ids=lambda b: b.__name__)
def test_a_reduction_over_positions_is_taken_over_visible_positions(block, impl):
    encoder = SparseEncoder(resnet_with(block), impl=impl)  # the probe passes, every weight randomised
    assert_equals_dense_with_every_patch_visible(encoder, resnet_with(block))


def assert_equals_dense_with_every_patch_visible(encoder: SparseEncoder, dense: nn.Module) -> None:
    dense.load_state_dict(encoder.dense_state_dict())
    dense.double().eval()
    encoder.double().eval()
    x = torch.randn(2, 3, 64, 128, dtype=torch.float64)
    with torch.no_grad():
        expected = dense.forward_intermediates(x, indices=4, intermediates_only=True)
        for s, d in zip(encoder(x), expected):
            torch.testing.assert_close(s, d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block,op", list(REFUSED.items()), ids=lambda b: getattr(b, "__name__", b))
def test_a_reduction_that_cannot_run_sparsely_is_refused_naming_block_class_and_operation(block, op, impl):
    with pytest.raises(UnsupportedLayerError, match=rf"layer\d\.0\.se.*{block.__name__}.*{op}"):
        SparseEncoder(resnet_with(block), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_block_that_asserts_on_shapes_is_refused_by_name(impl):
    """timm's bilinear attention transform asserts that the map divides its block size."""
    model = timm.create_model("resnet18", num_classes=0, global_pool="", block_args=dict(attn_layer="bat"))
    with pytest.raises(UnsupportedLayerError, match=r"layer\d\.\d\.se.*BilinearAttnTransform|BatNonLocalAttn"):
        SparseEncoder(model, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_leak_probe_fails_on_a_block_that_counts_masked_positions(impl):
    with pytest.raises(ValueError, match=r"layer '[\w.]*se' \(CountsMaskedMeanGate\)"):
        SparseEncoder(resnet_with(CountsMaskedMeanGate), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block", [AminGate, FlattenMaxGate, SoftmaxPoolGate], ids=lambda b: b.__name__)
def test_the_leak_probe_names_a_pooling_block_left_dense(block, impl):
    """The same block without its conversion (its dense class back): a max or min counting a masked
    zero is invisible to one-vs-two widths of masked padding; the all-visible comparison sees it."""
    encoder = SparseEncoder(resnet_with(block), impl=impl)
    layer = encoder.model.layer2[0].se
    assert isinstance(layer, SparseLayer)
    dense = block.__new__(block)
    dense.__dict__.update(layer.__dict__)
    encoder.model.layer2[0].se = dense
    finding = find_leak(encoder, randomise=True)
    assert finding is not None and f"layer 'layer2.0.se' ({block.__name__})" in finding, finding


@pytest.mark.parametrize("name", ["gcresnext26ts", "gcresnet33ts"])
@pytest.mark.parametrize("impl", IMPLS)
def test_global_context_models_are_leak_free_with_every_weight_randomised(name, impl):
    encoder = SparseEncoder(name, impl=impl)
    assert find_leak(encoder, randomise=True, seed=5) is None
    assert_equals_dense_with_every_patch_visible(encoder, timm.create_model(name, num_classes=0, global_pool=""))


class InnerMaxGate(nn.Module):
    """A gate a user puts after a block's convolution: x * sigmoid(max over positions)."""

    def forward(self, x):
        return x * x.amax((2, 3), keepdim=True).sigmoid()


def resnet_with_a_gate_inside_a_block() -> nn.Module:
    model = timm.create_model("resnet18", num_classes=0, global_pool="")
    model.layer3[0].conv1 = nn.Sequential(model.layer3[0].conv1, InnerMaxGate())
    return model


def visible_features_change_when_masked_patches_are_added(encoder: SparseEncoder) -> float:
    """Largest change of the visible part of any feature map between one visible patch alone and
    the same patch with three masked patches beside it (every weight randomised, eval mode)."""
    probe = copy.deepcopy(encoder).double()
    randomise_like_training(probe, torch.Generator().manual_seed(0))
    probe.eval()
    r = probe.downsample_ratio
    image = torch.randn(1, 3, r, r, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    one = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with torch.no_grad():
        alone, beside = probe(image, one), probe(F.pad(image, (0, 3 * r)), F.pad(one, (0, 3)))
    return max((a - b.narrow(-1, 0, a.shape[-1])).abs().max().item() for a, b in zip(alone, beside))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_reducing_module_inside_a_block_the_fast_path_knows_is_taken_over_visible_positions(impl):
    """Trust in a known block covers its own code, not an unknown module put inside it: the gate is
    found, converted (the block then runs layer by layer) and nothing masked reaches a visible feature."""
    encoder = SparseEncoder(resnet_with_a_gate_inside_a_block(), impl=impl)
    assert isinstance(encoder.model.layer3[0].conv1[1], VisibleReductions)
    assert visible_features_change_when_masked_patches_are_added(encoder) < 1e-9
    assert_equals_dense_with_every_patch_visible(encoder, resnet_with_a_gate_inside_a_block())
