"""SegFormer texture segmenter (Xie et al. 2021): a hierarchical Transformer encoder and an all-MLP decoder.

Encoder (Mix Transformer): four stages at strides 4/8/16/32, each an overlapping patch embedding (a strided
conv whose kernel overlaps its neighbours: 7x7 stride 4, then 3x3 stride 2) followed by ``blocks``
Transformer blocks. Attention is efficient self-attention: keys and values come from the token map shrunk by
a strided conv (spatial reduction ratio R: R^2 fewer keys). The feed-forward is Mix-FFN (a 3x3 depthwise
conv between its two linear layers), which gives the positional information, so there are no position
embeddings and any input size works. Decoder: each stage's map is projected to one width, upsampled to
stride 4, concatenated and fused, then classified per pixel and upsampled to the input.

Sized for 64-px mosaics: stage widths ``dim`` x 1/2/4/8 with 1/2/4/8 heads (heads of ``dim`` channels),
reduction ratios 4/2/1/1 (MiT's 8/4/2/1 are for 512-px crops).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.segmenter_base import Segmenter, Tta, check_tta

WIDTH_FACTORS = (1, 2, 4, 8)
HEADS = (1, 2, 4, 8)
REDUCTION = (4, 2, 1, 1)
MLP_RATIO = 4
DECODER_FACTOR = 4  # the decoder's width in units of ``dim``
STRIDE = 32  # the last stage's


def _to_tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)


def _to_map(tokens: Tensor, h: int, w: int) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


class _EfficientSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reduce: nn.Module | None = None
        if reduction > 1:
            self.reduce = nn.Conv2d(dim, dim, reduction, stride=reduction)
            self.reduce_norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        b, n, c = tokens.shape
        source = tokens
        if self.reduce is not None:
            source = self.reduce_norm(_to_tokens(self.reduce(_to_map(tokens, h, w))))
        q = self.q(tokens).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(source).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _MixFFN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = MLP_RATIO * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        x = _to_tokens(self.dwconv(_to_map(self.fc1(tokens), h, w)))
        return self.fc2(F.gelu(x))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _EfficientSelfAttention(dim, heads, reduction)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = _MixFFN(dim)

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), h, w)
        return tokens + self.ffn(self.norm2(tokens), h, w)


class _Stage(nn.Module):
    """Overlapping patch embedding, Transformer blocks, LayerNorm; (B, C_in, H, W) -> (B, C, H/s, W/s)."""

    def __init__(self, c_in: int, dim: int, heads: int, reduction: int, blocks: int, first: bool) -> None:
        super().__init__()
        kernel, stride = (7, 4) if first else (3, 2)
        self.embed = nn.Conv2d(c_in, dim, kernel, stride=stride, padding=kernel // 2)
        self.embed_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, reduction) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        h, w = x.shape[-2:]
        tokens = self.embed_norm(_to_tokens(x))
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return _to_map(self.norm(tokens), h, w)


class SegFormer(Segmenter):
    """SegFormer; ``dim`` = the first stage's width (and every head's), ``blocks`` = Transformer blocks per stage."""

    arch: ClassVar[str] = "segformer"

    def __init__(self, num_classes: int, dim: int = 16, blocks: int = 1, tta: Tta = "none") -> None:
        super().__init__()
        if num_classes < 2 or dim < 1 or blocks < 1:
            raise ValueError(
                f"SegFormer needs num_classes >= 2, dim >= 1, blocks >= 1; got {num_classes}, {dim}, {blocks}"
            )
        check_tta(tta)
        self.kwargs = {"num_classes": num_classes, "dim": dim, "blocks": blocks, "tta": tta}
        self.multiple = STRIDE
        widths = [dim * f for f in WIDTH_FACTORS]
        self.stages = nn.ModuleList(
            _Stage(3 if i == 0 else widths[i - 1], widths[i], HEADS[i], REDUCTION[i], blocks, i == 0)
            for i in range(len(widths))
        )
        decoder = DECODER_FACTOR * dim
        self.project = nn.ModuleList(nn.Conv2d(w, decoder, 1) for w in widths)  # the per-stage linear layers
        self.fuse = nn.Sequential(
            nn.Conv2d(len(widths) * decoder, decoder, 1, bias=False), nn.BatchNorm2d(decoder), nn.ReLU(inplace=True)
        )
        self.head = nn.Conv2d(decoder, num_classes, 1)

    def network(self, x: Tensor) -> Tensor:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        size = maps[0].shape[-2:]
        fused = [
            F.interpolate(p(m), size=size, mode="bilinear", align_corners=False) if i else p(m)
            for i, (p, m) in enumerate(zip(self.project, maps, strict=True))
        ]
        scores = self.head(self.fuse(torch.cat(fused, dim=1)))
        return F.interpolate(scores, scale_factor=4, mode="bilinear", align_corners=False)
