"""DeepLabv3 texture segmenter (Chen et al. 2017): an atrous residual backbone and an ASPP head.

The backbone (a stem conv, then residual stages of basic blocks, He et al. 2016) halves the resolution per
stage until ``output_stride`` (8 or 16), then runs one more stage atrous (dilation 2) where a classification
network would halve again: a larger field of view at the same resolution. ASPP (1x1, three atrous 3x3
branches, image pooling) reads context at several scales; a 1x1 conv gives class scores at the output
stride, upsampled bilinearly to the input (DeepLabv3 has no decoder).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.blocks import ASPP, conv_bn_relu
from pipeline.models.segmenter_base import Segmenter, Tta, check_tta

# ASPP rates per output stride. The paper's 6/12/18 at stride 16 (doubled at 8) suit 513-px crops (33-px maps);
# a 64-px mosaic gives 8-px maps at stride 8 and 4-px maps at 16, so the rates shrink in proportion.
ASPP_RATES = {8: (2, 4, 6), 16: (1, 2, 3)}
ATROUS_DILATION = 2


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN (the first may stride or dilate) plus the identity or a 1x1 conv-BN projection; ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(c_in, c_out, 3, dilation, stride)
        self.conv2 = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(c_out)
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class DeepLabV3(Segmenter):
    """DeepLabv3; ``channels`` = the stem's width (doubling per strided stage), ``blocks`` = residual blocks per
    stage, ``output_stride`` = the backbone's total stride (8 or 16)."""

    arch: ClassVar[str] = "deeplabv3"

    def __init__(
        self,
        num_classes: int,
        channels: int = 16,
        blocks: int = 1,
        output_stride: Literal[8, 16] = 8,
        tta: Tta = "none",
    ) -> None:
        super().__init__()
        if num_classes < 2 or channels < 1 or blocks < 1:
            raise ValueError(
                f"DeepLabV3 needs num_classes >= 2, channels >= 1, blocks >= 1; got {num_classes}, {channels}, {blocks}"
            )
        if output_stride not in ASPP_RATES:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        check_tta(tta)
        self.kwargs = {
            "num_classes": num_classes,
            "channels": channels,
            "blocks": blocks,
            "output_stride": output_stride,
            "tta": tta,
        }
        self.multiple = output_stride
        self.stem = conv_bn_relu(3, channels, 3)
        layers: list[nn.Module] = []
        c_in = channels
        plan = [(channels * 2**i, 2, 1) for i in range(int(math.log2(output_stride)))]
        plan.append((plan[-1][0], 1, ATROUS_DILATION))
        for width, stride, dilation in plan:
            for b in range(blocks):
                layers.append(_BasicBlock(c_in, width, stride if b == 0 else 1, dilation))
                c_in = width
        self.backbone = nn.Sequential(*layers)
        self.aspp = ASPP(c_in, c_in, ASPP_RATES[output_stride])
        self.head = nn.Conv2d(c_in, num_classes, 1)

    def network(self, x: Tensor) -> Tensor:
        scores = self.head(self.aspp(self.backbone(self.stem(x))))
        return F.interpolate(scores, scale_factor=self.multiple, mode="bilinear", align_corners=False)
