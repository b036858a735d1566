"""U-Net texture segmenter (Ronneberger et al. 2015) with an optional atrous (DeepLab-style) bottleneck.

``depth`` counts resolution levels including the bottleneck: ``channels=16, depth=3`` has encoder
widths 16/32 and a 64-wide bottleneck at 1/4 resolution. The decoder merges each skip as in the paper
(``"concat"``: concatenate, two 3x3 convs) or as in LinkNet (Chaurasia & Culurciello 2017, ``"add"``:
project the deeper map to the skip's width, add, one 3x3 conv), which costs about half as much: the
concatenating convs at full and half resolution are most of a shallow U-Net's work. Under DDP the
trainer can synchronise BatchNorm across ranks (``segmenter.sync_bn``).

Test-time views, input normalisation and any input size come from :class:`~pipeline.models.segmenter_base.Segmenter`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.blocks import ASPP, conv_bn_relu, double_conv
from pipeline.models.segmenter_base import Segmenter, Tta, check_tta

# Atrous rates at the bottleneck (1/4 of a 64-px mosaic at depth 3 is 16 px: rates up to 6 still
# see mostly real pixels); DeepLabv3 uses 6/12/18 at its larger feature maps.
ATROUS_RATES = (2, 4, 6)


class _Up(nn.Module):
    """One decoder level: upsample the deeper map and merge the skip (concatenate + 2 convs, or add + 1 conv)."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, mode: str, merge: str) -> None:
        super().__init__()
        self.merge = merge
        if merge == "add":  # LinkNet: bring the deeper map to the skip's width first, at its low resolution
            if mode == "transpose":
                self.up: nn.Module = nn.ConvTranspose2d(c_in, c_skip, 2, stride=2)
            else:
                self.up = nn.Sequential(
                    conv_bn_relu(c_in, c_skip, 1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
                )
            self.conv: nn.Module = conv_bn_relu(c_skip, c_out, 3)
            return
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(c_in, c_skip, 2, stride=2)
            c_cat = 2 * c_skip
        else:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            c_cat = c_in + c_skip
        self.conv = double_conv(c_cat, c_out)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        if self.merge == "add":
            return self.conv(skip + self.up(x))
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(Segmenter):
    """U-Net; ``forward``/``logits`` as :class:`~pipeline.models.segmenter_base.Segmenter`."""

    arch: ClassVar[str] = "unet"

    def __init__(
        self,
        num_classes: int,
        channels: int = 16,
        depth: int = 3,
        upsample: Literal["bilinear", "transpose"] = "bilinear",
        dropout: float = 0.0,
        dilated_bottleneck: bool = False,
        decoder: Literal["concat", "add"] = "concat",
        tta: Tta = "none",
    ) -> None:
        super().__init__()
        if num_classes < 2 or channels < 1 or depth < 1:
            raise ValueError(
                f"UNet needs num_classes >= 2, channels >= 1, depth >= 1; got {num_classes}, {channels}, {depth}"
            )
        if upsample not in ("bilinear", "transpose"):
            raise ValueError(f"upsample must be 'bilinear' or 'transpose', got {upsample!r}")
        if decoder not in ("concat", "add"):
            raise ValueError(f"decoder must be 'concat' or 'add', got {decoder!r}")
        check_tta(tta)
        self.kwargs = {
            "num_classes": num_classes,
            "channels": channels,
            "depth": depth,
            "upsample": upsample,
            "dropout": float(dropout),
            "dilated_bottleneck": bool(dilated_bottleneck),
            "decoder": decoder,
            "tta": tta,
        }
        widths = [channels * 2**i for i in range(depth)]
        self.multiple = 2 ** (depth - 1)
        self.down = nn.ModuleList()
        c_in = 3
        for w in widths[:-1]:
            self.down.append(double_conv(c_in, w))
            c_in = w
        self.bottleneck = ASPP(c_in, widths[-1], ATROUS_RATES) if dilated_bottleneck else double_conv(c_in, widths[-1])
        # As in the paper: dropout at the end of the contracting path.
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList(
            _Up(widths[i + 1], widths[i], widths[i], upsample, decoder) for i in reversed(range(depth - 1))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def network(self, x: Tensor) -> Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.dropout(self.bottleneck(x))
        for up, skip in zip(self.up, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(x)
