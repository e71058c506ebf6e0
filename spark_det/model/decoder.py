"""SparK's light hierarchical (UNet-style) decoder."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn


class UpBlock(nn.Module):
    """x2 upsampling (transposed conv 4/2/1), then conv-BN-ReLU6-conv-BN."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU6(inplace=True),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """log2(downsample_ratio) up-steps from the coarsest grid to pixels, width halving each step.

    ``forward`` takes one dense feature map per scale, coarsest first; the i-th is added before
    the i-th up-step (so it must have ``widths[i]`` channels).
    """

    def __init__(self, downsample_ratio: int = 32, width: int = 768, out_channels: int = 3) -> None:
        super().__init__()
        steps = int(round(math.log2(downsample_ratio)))
        if 2**steps != downsample_ratio:
            raise ValueError(f"downsample_ratio must be a power of 2, got {downsample_ratio}")
        if width % 2**steps:
            raise ValueError(f"decoder width {width} must be divisible by 2**{steps}")
        self.widths = [width // 2**i for i in range(steps + 1)]
        self.blocks = nn.ModuleList(UpBlock(cin, cout) for cin, cout in zip(self.widths, self.widths[1:]))
        self.proj = nn.Conv2d(self.widths[-1], out_channels, kernel_size=1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        x = features[0]
        for i, block in enumerate(self.blocks):
            if 0 < i < len(features) and features[i] is not None:
                x = x + features[i]
            x = block(x)
        return self.proj(x)
