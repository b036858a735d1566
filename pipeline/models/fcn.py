"""FCN-8s texture segmenter (Long, Shelhamer & Darrell 2015): a VGG-style backbone of five conv stages,
each ending in a 2x max-pool, its classifier as convolutions, and class scores read at strides 32, 16 and 8.

The stride-32 scores are upsampled 2x and added to the scores of the stride-16 features (pool4), the sum
upsampled 2x and added to those of the stride-8 features (pool3), and that upsampled 8x to the input:
coarse, semantic scores refined by finer, more local ones. The paper's learned upsampling starts as
bilinear interpolation and barely moves from it; here it is fixed bilinear. As in the paper the pool3/pool4
score layers start at zero, so training starts from the stride-32 prediction.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.blocks import conv_bn_relu
from pipeline.models.segmenter_base import Segmenter, Tta, check_tta

STAGES = 5  # stride 32 at the end of the backbone, as VGG-16
MAX_WIDTH_FACTOR = 8  # VGG-16's widths 64/128/256/512/512: doubling up to 8x the first


def _upsample(x: Tensor, size: tuple[int, int] | None = None, scale: int | None = None) -> Tensor:
    return F.interpolate(x, size=size, scale_factor=scale, mode="bilinear", align_corners=False)


class FCN(Segmenter):
    """FCN-8s; ``channels`` = the first stage's width, ``convs`` = 3x3 conv-BN-ReLU blocks per stage."""

    arch: ClassVar[str] = "fcn"

    def __init__(self, num_classes: int, channels: int = 8, convs: int = 2, tta: Tta = "none") -> None:
        super().__init__()
        if num_classes < 2 or channels < 1 or convs < 1:
            raise ValueError(
                f"FCN needs num_classes >= 2, channels >= 1, convs >= 1; got {num_classes}, {channels}, {convs}"
            )
        check_tta(tta)
        self.kwargs = {"num_classes": num_classes, "channels": channels, "convs": convs, "tta": tta}
        self.multiple = 2**STAGES
        widths = [channels * min(2**i, MAX_WIDTH_FACTOR) for i in range(STAGES)]
        self.stages = nn.ModuleList()
        c_in = 3
        for w in widths:
            self.stages.append(nn.Sequential(*(conv_bn_relu(c_in if i == 0 else w, w, 3) for i in range(convs))))
            c_in = w
        # fc6/fc7 as convolutions (the paper's 7x7 + 1x1, here 3x3 + 1x1 at twice the last stage's width).
        self.classifier = nn.Sequential(conv_bn_relu(c_in, 2 * c_in, 3), conv_bn_relu(2 * c_in, 2 * c_in, 1))
        self.score32 = nn.Conv2d(2 * c_in, num_classes, 1)
        self.score16 = nn.Conv2d(widths[3], num_classes, 1)
        self.score8 = nn.Conv2d(widths[2], num_classes, 1)
        for layer in (self.score16, self.score8):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def network(self, x: Tensor) -> Tensor:
        pooled = []
        for stage in self.stages:
            x = F.max_pool2d(stage(x), 2)
            pooled.append(x)
        pool3, pool4 = pooled[2], pooled[3]
        scores = self.score32(self.classifier(x))
        scores = _upsample(scores, pool4.shape[-2:]) + self.score16(pool4)
        scores = _upsample(scores, pool3.shape[-2:]) + self.score8(pool3)
        return _upsample(scores, scale=8)
