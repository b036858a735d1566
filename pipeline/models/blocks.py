"""Convolutional building blocks the segmenter families share: conv-BN-ReLU, the double conv, ASPP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def conv_bn_relu(c_in: int, c_out: int, kernel: int, dilation: int = 1, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, "same" padding) -> BatchNorm -> ReLU: the block most levels of the networks are built of."""
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU blocks (a U-Net level)."""
    return nn.Sequential(*conv_bn_relu(c_in, c_out, 3), *conv_bn_relu(c_out, c_out, 3))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3, Chen et al. 2017): a 1x1 branch, a 3x3 branch per rate in
    ``rates``, image pooling; concatenated and fused by a 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(c_in, c_out, 1), *(conv_bn_relu(c_in, c_out, 3, r) for r in rates)])
        # No BatchNorm on the pooled 1x1 branch: its statistics would come from one value per image.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(c_out * (len(self.branches) + 1), c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))
