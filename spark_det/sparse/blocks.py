"""The fast path: whole timm blocks executed on the visible positions only.

A sparse image is a set of visible vectors. Inside a block, every per-position layer (1x1
convolution, LayerNorm, the ConvNeXt MLP, BatchNorm, activations, squeeze-excitation gates,
residual additions) runs on the gathered visible vectors ("rows", [N_visible, C]), which cuts
its arithmetic and memory traffic by the mask ratio and needs no re-masking; only spatial
convolutions run on the zero-filled dense map, whose visible outputs are gathered once. BatchNorm
statistics over rows are exactly the visible-position statistics, so outputs equal the reference
path (:mod:`.reference`) up to float rounding; tests check loss and gradients
for every supported family.

Row order is row-major (b, h, w) at every resolution (:meth:`ActiveMask.rows`), so rows of a
stride-2 shortcut line up with the rows of the block's output. Blocks whose structure is not the
standard one (anti-aliasing, DropBlock, avg-pool shortcuts, conv MLPs, ...) are not converted
here and fall back to per-layer sparse execution (:mod:`.layers`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, SEModule
from timm.layers.mlp import GlobalResponseNormMlp
from timm.models.convnext import ConvNeXtBlock
from timm.models.resnet import BasicBlock, Bottleneck

from .layers import POINTWISE_LAYERS, SparseLayer
from .norms import batch_norm_rows, layer_norm_rows, visible_mean_rows


def to_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [N, C] at the flat positions ``index`` (a view-then-gather in channels_last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).index_select(0, index)


def from_rows(rows: torch.Tensor, index: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Rows written into zeros: [B, C, H, W] in channels_last memory format, 0 at masked positions."""
    b, c, h, w = shape
    dense = rows.new_zeros(b * h * w, c)
    dense.index_put_((index,), rows)  # index_copy would keep ``rows`` alive for its backward; this only the index
    return dense.view(b, h, w, c).permute(0, 3, 1, 2)


def activate_map(act: nn.Module, rows: torch.Tensor, index: torch.Tensor,
                 shape: tuple[int, int, int, int]) -> torch.Tensor:
    """``act`` applied to the rows, scattered: on the scattered map when ``act(0) == 0`` (ReLU,
    SiLU, GELU, ...), so that before a dense convolution only one tensor is kept for backward."""
    if _keeps_zero(act):  # masked positions remain empty
        return act(from_rows(rows, index, shape))
    return from_rows(act(rows), index, shape)


@torch.compiler.assume_constant_result  # torch.compile asks once, while tracing, not in the graph
def _keeps_zero(act: nn.Module) -> bool:
    """Whether act(0) == 0, asked on a CPU tensor (no device synchronisation in the forward)."""
    try:
        return act(torch.zeros(1)).item() == 0
    except RuntimeError:  # e.g. parameters on another device (PReLU): keep the rows form
        return False


def pointwise_conv_rows(rows: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution (any stride: rows are taken at its output positions) as a matmul."""
    return F.linear(rows, conv.weight.flatten(1), conv.bias)


def per_sample_scale(drop_path: nn.Module, rows: torch.Tensor, sample: torch.Tensor, batch: int) -> torch.Tensor:
    """Stochastic depth on rows: the per-sample keep/scale factors DropPath would draw for the batch."""
    if not isinstance(drop_path, DropPath) or not drop_path.training or drop_path.drop_prob == 0.0:
        return rows
    return rows * drop_path(rows.new_ones(batch, 1))[sample]


def se_rows(se: SEModule, rows: torch.Tensor, sample: torch.Tensor, batch: int) -> torch.Tensor:
    squeeze = visible_mean_rows(rows, sample, batch)[:, :, None, None]
    gate = se.gate(se.fc2(se.act(se.bn(se.fc1(squeeze)))))[:, :, 0, 0]
    return rows * gate[sample]


def grn_rows(grn: nn.Module, rows: torch.Tensor, sample: torch.Tensor, batch: int) -> torch.Tensor:
    """ConvNeXt-V2 GlobalResponseNorm on rows: the spatial L2 norm is a per-sample sum of squares.

    An all-zero channel of a sample has norm 0 in the dense layer; here it gets the smallest
    normal float instead, so the backward pass stays finite (the value differs by < 1e-19).
    """
    square_sum = rows.new_zeros(batch, rows.shape[1]).index_add(0, sample, rows.square())
    norm = square_sum.clamp_min(torch.finfo(rows.dtype).tiny).sqrt()
    scale = norm / (norm.mean(dim=-1, keepdim=True) + grn.eps)
    return rows + torch.addcmul(grn.bias, grn.weight, rows * scale[sample])


class RowBlock(SparseLayer):
    """Base of the blocks that run on visible rows; ``sparse_sync`` all-reduces their BatchNorms."""

    sparse_sync: object = None

    @classmethod
    def supports(cls, block: nn.Module) -> bool:
        raise NotImplementedError


def _is_plain_bn(m: Optional[nn.Module]) -> bool:
    return type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm)


def _pointwise(*modules: nn.Module) -> bool:
    """Every module is elementwise (activations, dropout): safe to run on rows."""
    return all(isinstance(m, POINTWISE_LAYERS) for m in modules)


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _is_pointwise_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.padding == (0, 0)
            and m.groups == 1 and m.dilation == (1, 1))


def _is_conv_bn_shortcut(m: Optional[nn.Module]) -> bool:
    """None, or timm's default ``downsample_conv``: Sequential(1x1 conv with stride, BatchNorm)."""
    if m is None:
        return True
    return (isinstance(m, nn.Sequential) and len(m) == 2 and _is_pointwise_conv(m[0])
            and m[0].stride[0] == m[0].stride[1] and _is_plain_bn(m[1]))


def _supported_se(m: Optional[nn.Module]) -> bool:
    return m is None or (type(m) is SEModule and not m.add_maxpool and _pointwise(m.bn, m.act, m.gate))


class _ResNetRowBlock(RowBlock):
    """Shared tail of ResNet blocks: SE, stochastic depth, shortcut, final activation, scatter."""

    def _finish(self, rows: torch.Tensor, x: torch.Tensor, out_hw: tuple[int, int],
                last_act: nn.Module, act_on_map: bool = False, x_kept: bool = False) -> torch.Tensor:
        """``x_kept``: the block's first layer keeps the whole map ``x`` for backward anyway, so a
        strided shortcut convolution runs on it rather than on a gathered copy that it would keep."""
        b = x.shape[0]
        sample = self.active.sample_of_row(out_hw)
        index, shape = self.active.rows(out_hw), (b, rows.shape[1], *out_hw)
        if self.se is not None:
            rows = se_rows(self.se, rows, sample, b)
        if self.drop_path is not None:
            rows = per_sample_scale(self.drop_path, rows, sample, b)
        if self.downsample is None:
            shortcut = to_rows(x, index)
        else:
            conv, bn = self.downsample
            if x_kept:
                shortcut = to_rows(F.conv2d(x, conv.weight, conv.bias, conv.stride), index)
            else:
                stride = x.shape[-1] // out_hw[1]
                shortcut = pointwise_conv_rows(to_rows(x, self.active.rows(x.shape[-2:], stride=stride)), conv)
            shortcut = batch_norm_rows(shortcut, bn, self.sparse_sync)
        if act_on_map:
            return activate_map(last_act, rows + shortcut, index, shape)
        return from_rows(last_act(rows + shortcut), index, shape)


class RowBottleneck(_ResNetRowBlock, Bottleneck):
    """timm ResNet Bottleneck: conv1, conv3, shortcut and all norms on rows; conv2 (3x3) dense."""

    @classmethod
    def supports(cls, block: nn.Module) -> bool:
        return (type(block) is Bottleneck and _is_pointwise_conv(block.conv1) and block.conv1.stride == (1, 1)
                and _is_pointwise_conv(block.conv3) and block.conv3.stride == (1, 1)
                and all(_is_plain_bn(bn) for bn in (block.bn1, block.bn2, block.bn3))
                and _is_identity(block.drop_block) and _is_identity(block.aa)
                and _is_conv_bn_shortcut(block.downsample) and _supported_se(block.se)
                and _pointwise(block.act1, block.act2, block.act3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        sync = self.sparse_sync
        in_index = self.active.rows((h, w))
        rows = self.act1(batch_norm_rows(pointwise_conv_rows(to_rows(x, in_index), self.conv1), self.bn1, sync))
        y = self.conv2(from_rows(rows, in_index, (b, rows.shape[1], h, w)))
        out_hw = tuple(y.shape[-2:])
        rows = self.act2(batch_norm_rows(to_rows(y, self.active.rows(out_hw)), self.bn2, sync))
        rows = batch_norm_rows(pointwise_conv_rows(rows, self.conv3), self.bn3, sync)
        return self._finish(rows, x, out_hw, self.act3)


class RowBasicBlock(_ResNetRowBlock, BasicBlock):
    """timm ResNet BasicBlock: 3x3 convolutions dense, norms, shortcut and activations on rows."""

    @classmethod
    def supports(cls, block: nn.Module) -> bool:
        return (type(block) is BasicBlock and all(_is_plain_bn(bn) for bn in (block.bn1, block.bn2))
                and _is_identity(block.drop_block) and _is_identity(block.aa)
                and _is_conv_bn_shortcut(block.downsample) and _supported_se(block.se)
                and _pointwise(block.act1, block.act2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        sync = self.sparse_sync
        y = self.conv1(x)
        out_hw = tuple(y.shape[-2:])
        out_index = self.active.rows(out_hw)
        rows = batch_norm_rows(to_rows(y, out_index), self.bn1, sync)
        y = self.conv2(activate_map(self.act1, rows, out_index, (b, rows.shape[1], *out_hw)))
        rows = batch_norm_rows(to_rows(y, out_index), self.bn2, sync)
        # The output feeds the next block's dense 3x3 convolution: activated as a map, the tensor
        # the activation keeps for backward is the one that convolution keeps.
        return self._finish(rows, x, out_hw, self.act2, act_on_map=True, x_kept=True)


def _is_pointwise_fc(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_pointwise_conv(m) and m.stride == (1, 1)


def fc_rows(layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """A Linear layer, or a 1x1 convolution (ConvNeXt's ``conv_mlp`` variants), on rows."""
    return layer(rows) if isinstance(layer, nn.Linear) else pointwise_conv_rows(rows, layer)


class RowConvNeXtBlock(RowBlock, ConvNeXtBlock):
    """timm ConvNeXt block (V1 and V2, Linear or 1x1-conv MLP): depthwise 7x7 dense, then
    LayerNorm, MLP (with GRN for V2) and layer scale on rows."""

    @classmethod
    def supports(cls, block: nn.Module) -> bool:
        mlp = getattr(block, "mlp", None)
        if type(block) is not ConvNeXtBlock or type(mlp) not in (Mlp, GlobalResponseNormMlp):
            return False
        return (isinstance(block.shortcut, nn.Identity) and block.conv_dw.stride == (1, 1)
                and isinstance(block.norm, nn.LayerNorm) and _is_pointwise_fc(mlp.fc1) and _is_pointwise_fc(mlp.fc2)
                and _is_identity(getattr(mlp, "norm", None)) and _pointwise(mlp.act, mlp.drop1, mlp.drop2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        index = self.active.rows((h, w))
        norm, mlp = self.norm, self.mlp
        rows = to_rows(self.conv_dw(x), index)
        rows = layer_norm_rows(rows, norm)
        rows = mlp.drop1(mlp.act(fc_rows(mlp.fc1, rows)))
        if isinstance(mlp, GlobalResponseNormMlp):
            rows = grn_rows(mlp.grn, rows, self.active.sample_of_row((h, w)), b)
        rows = mlp.drop2(fc_rows(mlp.fc2, rows))
        if self.gamma is not None:
            rows = rows * self.gamma
        out = from_rows(rows, index, (b, rows.shape[1], h, w))
        return self.drop_path(out) + x


def densify_rows(feat: torch.Tensor, norm: nn.Module, fill: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """SparK's densify before the decoder, on rows: ``norm`` (a BatchNorm with visible statistics,
    or a LayerNorm over channels) on the visible rows at ``index``, the vector ``fill`` (the mask
    token, [1, C, 1, 1]) everywhere else. The norm keeps only rows for backward, not the whole map."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        rows = batch_norm_rows(to_rows(feat, index), norm, getattr(norm, "sparse_sync", None))
    elif isinstance(norm, nn.LayerNorm):
        rows = layer_norm_rows(to_rows(feat, index), norm)
    else:
        raise TypeError(f"densify on rows needs a BatchNorm or a LayerNorm, got {type(norm).__name__}")
    b, c, h, w = feat.shape
    dense = fill.to(rows.dtype).view(1, c).expand(b * h * w, c).clone()
    dense.index_put_((index,), rows)
    return dense.view(b, h, w, c).permute(0, 3, 1, 2)


ROW_BLOCKS: tuple[type[RowBlock], ...] = (RowBottleneck, RowBasicBlock, RowConvNeXtBlock)


def row_block_for(module: nn.Module) -> Optional[type[RowBlock]]:
    """The fast row implementation of ``module``, or None when it has none (use per-layer)."""
    return next((cls for cls in ROW_BLOCKS if cls.supports(module)), None)
