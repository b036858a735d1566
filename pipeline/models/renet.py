"""ReSeg texture segmenter (Visin et al. 2016): recurrent sweeps over a CNN feature map (ReNet layers).

A small CNN (two levels of two 3x3 conv-BN-ReLU, each followed by a 2x max-pool) gives a stride-4 map. Each
ReNet layer (Visin et al. 2015) runs a bidirectional RNN along every row, then another along every column of
the result, so every output position has seen the whole map: the global context a CNN needs depth for.
Upsampling (bilinear 2x + conv-BN-ReLU, twice) brings the map back to the input resolution
for per-pixel logits; ReSeg uses transposed convolutions there.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.blocks import conv_bn_relu
from pipeline.models.segmenter_base import Segmenter, Tta, check_tta

LEVELS = 2  # 2x pools before the sweeps: stride 4
CELLS: dict[str, type[nn.RNNBase]] = {"gru": nn.GRU, "lstm": nn.LSTM}


class _ReNetLayer(nn.Module):
    """(B, C, H, W) -> (B, 2 * hidden, H, W): a bidirectional sweep along the rows, then along the columns."""

    def __init__(self, c_in: int, hidden: int, cell: str) -> None:
        super().__init__()
        rnn = CELLS[cell]
        self.rows = rnn(c_in, hidden, batch_first=True, bidirectional=True)
        self.cols = rnn(2 * hidden, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        rows, _ = self.rows(x.permute(0, 2, 3, 1).reshape(b * h, w, c))  # (B*H, W, 2h)
        rows = rows.reshape(b, h, w, -1).transpose(1, 2).reshape(b * w, h, -1)  # one sequence per column
        cols, _ = self.cols(rows)  # (B*W, H, 2h)
        return cols.reshape(b, w, h, -1).permute(0, 3, 2, 1)


class ReNet(Segmenter):
    """ReSeg; ``channels`` = the CNN's first width (doubled at the second level), ``hidden`` = RNN units per
    direction, ``layers`` = ReNet layers, ``cell`` = ``"gru"`` or ``"lstm"``."""

    arch: ClassVar[str] = "renet"

    def __init__(
        self,
        num_classes: int,
        channels: int = 16,
        hidden: int = 32,
        layers: int = 1,
        cell: Literal["gru", "lstm"] = "gru",
        tta: Tta = "none",
    ) -> None:
        super().__init__()
        if num_classes < 2 or channels < 1 or hidden < 1 or layers < 1:
            raise ValueError(
                f"ReNet needs num_classes >= 2, channels, hidden, layers >= 1; "
                f"got {num_classes}, {channels}, {hidden}, {layers}"
            )
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
        check_tta(tta)
        self.kwargs = {
            "num_classes": num_classes,
            "channels": channels,
            "hidden": hidden,
            "layers": layers,
            "cell": cell,
            "tta": tta,
        }
        self.multiple = 2**LEVELS
        widths = [channels * 2**i for i in range(LEVELS)]
        self.encoder = nn.ModuleList()
        c_in = 3
        for w in widths:
            self.encoder.append(nn.Sequential(*conv_bn_relu(c_in, w, 3), *conv_bn_relu(w, w, 3)))
            c_in = w
        self.sweeps = nn.ModuleList()
        for _ in range(layers):
            self.sweeps.append(_ReNetLayer(c_in, hidden, cell))
            c_in = 2 * hidden
        self.decoder = nn.ModuleList()
        for w in reversed(widths):
            self.decoder.append(conv_bn_relu(c_in, w, 3))
            c_in = w
        self.head = nn.Conv2d(c_in, num_classes, 1)

    def network(self, x: Tensor) -> Tensor:
        for level in self.encoder:
            x = F.max_pool2d(level(x), 2)
        for sweep in self.sweeps:
            x = sweep(x)
        for level in self.decoder:
            x = level(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.head(x)
