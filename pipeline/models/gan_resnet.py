"""Residual GAN (SNGAN, Miyato et al. 2018; BigGAN-style blocks, Brock et al. 2019): ``gan.arch: resnet``.

- :class:`ResNetGenerator`: ``z`` -> a linear layer to the first ``side x side`` map, then one up-block per
  doubling (conditional BatchNorm, ReLU, 2x nearest upsampling, two 3x3 convs; a 1x1 conv on the upsampled
  shortcut). The class enters only through conditional BatchNorm: a per-class gain and bias after every
  normalisation (de Vries et al. 2017, as in SNGAN/BigGAN's generators). BatchNorm, ReLU, 3x3 conv, ``tanh``.
- :class:`ResNetDiscriminator`: one down-block per halving (ReLU, two 3x3 convs, 2x average pooling; the
  first block without the leading ReLU, as SNGAN's "optimised" block), ReLU, global sum pooling, and the
  same ``gan.conditioning`` choices as the DCGAN discriminator (concat, projection, ac, adc). No BatchNorm.

Widths follow the DCGAN's: G starts at ``channels * 2**(blocks - 1)`` and halves per block; D mirrors it.
``attention`` adds a SAGAN block after the feature map of that side in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.gan_blocks import (
    CLASS_HEADS,
    CONDITIONINGS,
    INIT_STD,
    Conditioning,
    ImageGenerator,
    SelfAttention,
    check_attention,
    layout,
    spectral,
    with_class_maps,
)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine, then a gain and a bias per class (``gain`` starts at 1 + N(0, 0.02), as
    DCGAN initialises BatchNorm, so classes differ from the first step; ``bias`` at 0)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.normal_(self.gain.weight, 1.0, INIT_STD)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        gain, bias = self.gain(labels)[:, :, None, None], self.bias(labels)[:, :, None, None]
        return self.bn(x) * gain.to(x.dtype) + bias.to(x.dtype)


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_classes: int) -> None:
        super().__init__()
        # No biases: every block's output reaches a BatchNorm, which cancels a per-channel constant; Adam would
        # turn the round-off "gradients" of such biases into full-size random steps.
        self.bn1 = ConditionalBatchNorm(c_in, num_classes)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn2 = ConditionalBatchNorm(c_out, num_classes)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x, labels)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), labels)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, first: bool, spectral_norm: bool) -> None:
        super().__init__()
        sn = spectral(spectral_norm)
        self.first = first
        self.conv1 = sn(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.conv2 = sn(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.shortcut = sn(nn.Conv2d(c_in, c_out, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x if self.first else F.relu(x))
        h = F.avg_pool2d(self.conv2(F.relu(h)), 2)
        # The first block pools before its 1x1 shortcut (SNGAN's optimised block); the others after it.
        skip = self.shortcut(F.avg_pool2d(x, 2)) if self.first else F.avg_pool2d(self.shortcut(x), 2)
        return h + skip


class ResNetGenerator(ImageGenerator):
    """``forward(z (B, z_dim), labels (B,)) -> images (B, 3, S, S)`` in [-1, 1]; the class through conditional BN."""

    arch = "resnet"

    def __init__(self, num_classes: int, z_dim: int, channels: int, image_size: int, attention: int = 0) -> None:
        super().__init__()
        check_attention(attention, image_size)
        self.kwargs = {"num_classes": num_classes, "z_dim": z_dim, "channels": channels, "image_size": image_size}
        if attention:
            self.kwargs["attention"] = attention
        self.num_classes, self.z_dim, self.image_size = num_classes, z_dim, image_size
        self.side, blocks = layout(image_size)
        width = channels * 2 ** (blocks - 1)
        self.linear = nn.Linear(z_dim, width * self.side * self.side)
        self.blocks = nn.ModuleList()
        self.attention_at = -1  # the map after block ``attention_at`` (-1: the linear layer's) gets attention
        side = self.side
        self.attention = SelfAttention(width) if side == attention else None
        for i in range(blocks):
            self.blocks.append(UpBlock(width, width // 2, num_classes))
            width, side = width // 2, side * 2
            if side == attention:
                self.attention, self.attention_at = SelfAttention(width), i
        self.bn = nn.BatchNorm2d(width)
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        h = self.linear(z).view(z.shape[0], -1, self.side, self.side)
        if self.attention is not None and self.attention_at == -1:
            h = self.attention(h)
        for i, block in enumerate(self.blocks):
            h = block(h, labels)
            if self.attention is not None and self.attention_at == i:
                h = self.attention(h)
        return torch.tanh(self.out(F.relu(self.bn(h))))


class ResNetDiscriminator(nn.Module):
    """``forward(images (B, 3, S, S) in [-1, 1], labels (B,)) -> logits (B,)``; ``with_classes=True`` also returns
    the class head's logits (``ac``: K, ``adc``: 2K), as :class:`pipeline.models.gan.Discriminator` does."""

    def __init__(
        self,
        num_classes: int,
        channels: int,
        image_size: int,
        conditioning: Conditioning = "concat",
        spectral_norm: bool = False,
        attention: int = 0,
    ) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, got {conditioning!r}")
        check_attention(attention, image_size)
        self.num_classes, self.conditioning = num_classes, conditioning
        _, blocks = layout(image_size)
        sn = spectral(spectral_norm)
        c_in = 3 + (num_classes if conditioning == "concat" else 0)
        self.blocks = nn.ModuleList()
        self.attention, self.attention_at = None, -1
        width, side = channels, image_size
        for i in range(blocks):
            self.blocks.append(DownBlock(c_in if i == 0 else width // 2, width, i == 0, spectral_norm))
            side //= 2
            if side == attention:
                self.attention, self.attention_at = SelfAttention(width, spectral_norm), i
            if i < blocks - 1:
                width *= 2
        self.linear = sn(nn.Linear(width, 1))
        self.embed = sn(nn.Embedding(num_classes, width)) if conditioning == "projection" else None
        heads = CLASS_HEADS.get(conditioning, 0)
        self.classifier = sn(nn.Linear(width, heads * num_classes)) if heads else None

    def forward(self, images: Tensor, labels: Tensor, with_classes: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if with_classes and self.classifier is None:
            raise ValueError(f"class logits need a class head (conditioning {', '.join(CLASS_HEADS)})")
        h = with_class_maps(images, labels, self.num_classes) if self.conditioning == "concat" else images
        for i, block in enumerate(self.blocks):
            h = block(h)
            if self.attention is not None and self.attention_at == i:
                h = self.attention(h)
        pooled = F.relu(h).sum((2, 3))
        logits = self.linear(pooled).flatten()
        if self.embed is not None:
            logits = logits + (self.embed(labels) * pooled).sum(1)
        if with_classes:
            return logits, self.classifier(F.relu(h).mean((2, 3)))
        return logits
