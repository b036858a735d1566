"""U-Net texture segmenter (Ronneberger et al. 2015) with an optional atrous (DeepLab-style) bottleneck.

``depth`` counts resolution levels including the bottleneck: ``channels=16, depth=3`` has encoder
widths 16/32 and a 64-wide bottleneck at 1/4 resolution. The decoder merges each skip as in the paper
(``"concat"``: concatenate, two 3x3 convs) or as in LinkNet (Chaurasia & Culurciello 2017, ``"add"``:
project the deeper map to the skip's width, add, one 3x3 conv), which costs about half as much: the
concatenating convs at full and half resolution are most of a shallow U-Net's work. Under DDP the
trainer can synchronise BatchNorm across ranks (``segmenter.sync_bn``).

In eval mode the model can average its class probabilities over the dihedral views of the input
(``tta``: ``"flip"`` = the 4 flips, ``"d8"`` = the 4 rotations x 2 flips; test-time augmentation):
a texture's class does not change when it is flipped or turned, but the single view's mistakes,
mostly within a few pixels of a region border, do. Training (train mode) always sees one view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import checkpoint
from pipeline.distributed import plain_module

# Images arrive in [0, 1]; the model normalises them itself so every caller (training, evaluation,
# serving) feeds the same thing. Texture pixels have no dataset-wide colour prior worth fitting.
INPUT_MEAN = 0.5
INPUT_STD = 0.25
# Atrous rates at the bottleneck (1/4 of a 64-px mosaic at depth 3 is 16 px: rates up to 6 still
# see mostly real pixels); DeepLabv3 uses 6/12/18 at its larger feature maps.
ATROUS_RATES = (2, 4, 6)
# Test-time views: (quarter turns, horizontal flip) pairs, each undone on the prediction.
TTA_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flip": ((0, False), (0, True), (2, False), (2, True)),  # identity, h-flip, rot180 = h+v flip, v-flip
    "d8": tuple((k, flip) for k in range(4) for flip in (False, True)),
}


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, "same" padding) -> BatchNorm -> ReLU: the block every level of the network is built of."""
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(c_in, c_out, 3), *_conv_bn_relu(c_out, c_out, 3))


class AtrousBottleneck(nn.Module):
    """ASPP (DeepLabv3): a 1x1 branch, 3x3 branches at :data:`ATROUS_RATES`, image pooling; fused by a 1x1 conv."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()

        self.branches = nn.ModuleList(
            [_conv_bn_relu(c_in, c_out, 1), *(_conv_bn_relu(c_in, c_out, 3, r) for r in ATROUS_RATES)]
        )
        # No BatchNorm on the pooled 1x1 branch: its statistics would come from one value per image.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True))
        self.project = _conv_bn_relu(c_out * (len(self.branches) + 1), c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


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
                    _conv_bn_relu(c_in, c_skip, 1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
                )
            self.conv: nn.Module = _conv_bn_relu(c_skip, c_out, 3)
            return
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(c_in, c_skip, 2, stride=2)
            c_cat = 2 * c_skip
        else:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            c_cat = c_in + c_skip
        self.conv = _double_conv(c_cat, c_out)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        if self.merge == "add":
            return self.conv(skip + self.up(x))
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """``forward(images (B, 3, H, W) in [0, 1]) -> logits (B, num_classes, H, W)``, any H and W.

    In eval mode with ``tta`` the logits are the log of the views' mean probabilities (argmax as usual).
    """

    def __init__(
        self,
        num_classes: int,
        channels: int = 16,
        depth: int = 3,
        upsample: Literal["bilinear", "transpose"] = "bilinear",
        dropout: float = 0.0,
        dilated_bottleneck: bool = False,
        decoder: Literal["concat", "add"] = "concat",
        tta: Literal["none", "flip", "d8"] = "none",
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
        if tta not in TTA_VIEWS:
            raise ValueError(f"tta must be one of {', '.join(TTA_VIEWS)}, got {tta!r}")
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
            self.down.append(_double_conv(c_in, w))
            c_in = w
        self.bottleneck = AtrousBottleneck(c_in, widths[-1]) if dilated_bottleneck else _double_conv(c_in, widths[-1])
        # As in the paper: dropout at the end of the contracting path.
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList(
            _Up(widths[i + 1], widths[i], widths[i], upsample, decoder) for i in reversed(range(depth - 1))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @property
    def num_classes(self) -> int:
        return self.kwargs["num_classes"]

    def forward(self, images: Tensor) -> Tensor:
        """Logits of one view in train mode; in eval mode with ``tta``, log of the views' mean probabilities."""
        views = TTA_VIEWS[self.kwargs["tta"]]
        if self.training or len(views) == 1:
            return self.logits(images)
        probs = None
        for turns, flip in views:
            x = images.rot90(turns, (2, 3))
            p = self.logits(x.flip(3) if flip else x).float().softmax(1)
            p = (p.flip(3) if flip else p).rot90(-turns, (2, 3))
            probs = p if probs is None else probs + p
        return (probs / len(views)).clamp_min(torch.finfo(probs.dtype).tiny).log()

    def logits(self, images: Tensor) -> Tensor:
        """The network's logits for one view of ``images`` (no test-time augmentation)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        x = (images - INPUT_MEAN) / INPUT_STD
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        if pad_h or pad_w:  # any size in, same size out: pad to the pooling multiple, crop the logits
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.dropout(self.bottleneck(x))
        for up, skip in zip(self.up, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(x)[..., :h, :w]


def save_segmenter(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """The segmenter model file (see :func:`pipeline.checkpoint.save_model`); ``model`` may be DDP-wrapped."""
    net = plain_module(model)
    if not isinstance(net, UNet):
        raise TypeError(f"expected a UNet (optionally DDP-wrapped), got {type(net).__name__}")
    checkpoint.save_model(path, net, net.kwargs, meta)


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """The saved U-Net in eval mode on ``device``, and its meta (``classes``, ``run_id``, ``val_miou``, ...)."""
    model, meta = checkpoint.load_model(path, UNet, "segmenter model")
    return model.to(device).eval(), meta
