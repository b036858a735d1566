"""Pieces every generator family shares: the generator interface, the layout of feature-map sides, the
DCGAN-style strided conv stacks, SAGAN self-attention and the discriminator's class conditioning.

Kept apart from :mod:`pipeline.models.gan` (the family registry and the model file) so that the family
modules (:mod:`pipeline.models.gan_resnet`, :mod:`pipeline.models.vae`) build on them without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

Conditioning = Literal["concat", "projection", "ac", "adc"]
CLASS_HEADS = {"ac": 1, "adc": 2}  # conditionings with a class head: its logits per class
CONDITIONINGS: tuple[str, ...] = get_args(Conditioning)
MIN_SIDE = 4  # the smallest feature map: 16/32/64-px patches start (G) and end (D) at 4 x 4
LEAK = 0.2
INIT_STD = 0.02  # DCGAN initialisation


class ImageGenerator(nn.Module):
    """What every generator family is: ``forward(z (B, z_dim), labels (B,)) -> images (B, 3, S, S)`` in [-1, 1].

    ``kwargs`` rebuilds the same architecture (the model file stores ``{"arch": arch, **kwargs}``).
    """

    arch: str
    num_classes: int
    z_dim: int
    image_size: int
    kwargs: dict[str, Any]


def layout(image_size: int) -> tuple[int, int]:
    """``(side, blocks)``: the first map's side and the number of 2x up/down blocks for ``image_size``.

    Halve while the result stays an integer >= :data:`MIN_SIDE`: 16 -> (4, 2), 32 -> (4, 3), 64 -> (4, 4),
    48 -> (6, 3).
    """
    if image_size < 2 * MIN_SIDE or image_size % 2:
        raise ValueError(f"image_size must be an even number >= {2 * MIN_SIDE}, got {image_size}")
    side, blocks = image_size, 0
    while side % 2 == 0 and side // 2 >= MIN_SIDE:
        side, blocks = side // 2, blocks + 1
    return side, blocks


def attention_sides(image_size: int) -> tuple[int, ...]:
    """The inner feature-map sides of G and D for ``image_size`` (where self-attention can go), largest first."""
    _, blocks = layout(image_size)
    return tuple(image_size >> j for j in range(1, blocks + 1))


def check_attention(attention: int, image_size: int) -> None:
    sides = attention_sides(image_size)
    if attention and attention not in sides:
        listed = ", ".join(map(str, sides))
        raise ValueError(f"attention must be 0 or a feature-map side of {image_size} px ({listed}), got {attention}")


def init_dcgan(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, INIT_STD)
            nn.init.zeros_(m.bias)


def spectral(enabled: bool) -> Callable[[nn.Module], nn.Module]:
    """Spectral norm (Miyato et al. 2018) on a layer when ``enabled``, else the layer itself."""
    return _spectral_norm if enabled else (lambda m: m)


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019): every position attends to every other, ``x + gamma * o``.

    ``gamma`` starts at 0, so a new block begins as the identity and the network learns how much to use it.
    Query and key have ``channels / 8`` maps, value ``channels / 2`` (as BigGAN); spectral norm on D's.
    """

    def __init__(self, channels: int, spectral_norm: bool = False) -> None:
        super().__init__()
        sn = spectral(spectral_norm)
        inner, value = max(1, channels // 8), max(1, channels // 2)
        self.query = sn(nn.Conv2d(channels, inner, 1, bias=False))
        self.key = sn(nn.Conv2d(channels, inner, 1, bias=False))
        self.value = sn(nn.Conv2d(channels, value, 1, bias=False))
        self.out = sn(nn.Conv2d(value, channels, 1, bias=False))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = (f(x).flatten(2) for f in (self.query, self.key, self.value))  # (B, c, N)
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # (B, N, N): row i attends over positions
        o = torch.bmm(v, attn.transpose(1, 2)).view(b, -1, h, w)
        return x + self.gamma * self.out(o.contiguous(memory_format=_memory_format(x)))


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def one_hot_input(z: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``[z, one_hot(labels)]`` (B, z_dim + num_classes): the DCGAN-style generators' input."""
    return torch.cat([z, F.one_hot(labels, num_classes).to(z.dtype)], 1)


def with_class_maps(images: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``images`` with one constant one-hot map per class appended (``concat`` conditioning)."""
    onehot = F.one_hot(labels, num_classes).to(images.dtype)
    maps = onehot[:, :, None, None].expand(-1, -1, *images.shape[-2:])
    return torch.cat([images, maps.contiguous(memory_format=_memory_format(images))], 1)


def upsampling_stack(c_in: int, channels: int, image_size: int, c_out: int, attention: int = 0) -> list[nn.Module]:
    """DCGAN's generator layers: a transposed conv from a 1 x 1 input to the first map, one stride-2 transposed
    conv + BatchNorm + ReLU per doubling, a last transposed conv to ``c_out`` maps at ``image_size``; a
    :class:`SelfAttention` after the map of side ``attention`` (0: none)."""
    check_attention(attention, image_size)
    side, blocks = layout(image_size)
    width = channels * 2 ** (blocks - 1)
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(c_in, width, side, 1, 0, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    ]
    if side == attention:
        layers.append(SelfAttention(width))
    for _ in range(blocks - 1):
        layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2)]
        layers.append(nn.ReLU(inplace=True))
        width, side = width // 2, side * 2
        if side == attention:
            layers.append(SelfAttention(width))
    layers.append(nn.ConvTranspose2d(width, c_out, 4, 2, 1))
    return layers


def downsampling_stack(
    c_in: int, channels: int, image_size: int, batch_norm: bool, spectral_norm: bool, attention: int = 0
) -> tuple[list[nn.Module], int]:
    """DCGAN's discriminator layers (stride-2 4x4 convs + LeakyReLU(0.2), BatchNorm after the first when asked)
    down to the last map, and its width; a :class:`SelfAttention` after the map of side ``attention``."""
    check_attention(attention, image_size)
    side, blocks = layout(image_size)
    sn = spectral(spectral_norm)
    layers: list[nn.Module] = [sn(nn.Conv2d(c_in, channels, 4, 2, 1)), nn.LeakyReLU(LEAK, inplace=True)]
    width, side = channels, image_size // 2
    if side == attention:
        layers.append(SelfAttention(width, spectral_norm))
    for _ in range(blocks - 1):
        layers.append(sn(nn.Conv2d(width, width * 2, 4, 2, 1, bias=not batch_norm)))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width * 2))
        layers.append(nn.LeakyReLU(LEAK, inplace=True))
        width, side = width * 2, side // 2
        if side == attention:
            layers.append(SelfAttention(width, spectral_norm))
    return layers, width
