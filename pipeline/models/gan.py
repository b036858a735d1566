"""Class-conditional texture generators: the DCGAN (Radford et al. 2015) with the usual stabilisers as
options, the family registry (``gan.arch``) and the one generator model file.

- :class:`Generator`: ``z`` and a one-hot class go through a transposed conv to a ``side x side`` map
  (``side`` = 4 for 16/32/64-px patches), then one stride-2 transposed conv block per doubling, BatchNorm +
  ReLU, ``tanh`` output in [-1, 1]. Optionally (``fourier > 0``) a :class:`FourierHead` adds per-sample
  sinusoids, bent by a phase map from the last conv unless ``fourier_warp`` is false, before the ``tanh``.
- :class:`Discriminator`: the mirror image with LeakyReLU(0.2). The class enters either as one-hot maps
  concatenated to the image (``"concat"``), through a projection (Miyato & Koyama 2018:
  ``<embed(y), sum-pooled features>`` added to the logit), or not at all (``"ac"``, AC-GAN, Odena et al.
  2017: an unconditional real/fake logit plus a class head on the same features, which the trainer
  fits to the real labels and the generator must satisfy). ``"adc"`` (ADC-GAN, Hou et al. 2022) widens
  that head to ``2 * num_classes`` logits, real and generated per class, which removes AC-GAN's pull
  towards easily classified, alike samples. Optional spectral norm
  (Miyato et al. 2018) on every layer and optional BatchNorm (the trainer drops it with spectral norm or a
  gradient penalty, as SN-GAN, WGAN-GP and R1 do). ``attention`` (both) adds a SAGAN self-attention block
  after the feature map of that side.
- :data:`GENERATORS`: the families by ``gan.arch`` name (``dcgan``, ``resnet``: :mod:`pipeline.models.gan_resnet`,
  ``vae``: the decoder of :mod:`pipeline.models.vae`), built from params by :func:`generator_from_config` (and
  the models trained beside them: :func:`discriminator_from_config`, :func:`encoder_from_config`).
- :class:`EMA` of the generator's weights (the model that is evaluated and shipped), :func:`diff_augment`
  (Zhao et al. 2020: colour, translation, cutout; differentiable, applied to real and fake images).
- :func:`generate_images`, :func:`save_generator`, :func:`load_generator`: the model file contract. A model
  file is :func:`pipeline.checkpoint.save_model`'s ``{"kwargs", "state_dict", "meta"}`` with the family in
  ``kwargs["arch"]``; files without it (written before there were other families) hold a DCGAN.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import checkpoint
from pipeline.config import GanConfig
from pipeline.models.gan_blocks import (
    CLASS_HEADS,
    CONDITIONINGS,
    Conditioning,
    ImageGenerator,
    downsampling_stack,
    init_dcgan,
    layout,
    one_hot_input,
    spectral,
    upsampling_stack,
    with_class_maps,
)
from pipeline.models.gan_resnet import ResNetDiscriminator, ResNetGenerator
from pipeline.models.vae import VaeDecoder, VaeEncoder

AUGMENTATIONS = ("color", "translation", "cutout")
EMA_WARMUP = 10  # EMA decay ramps as (1 + t) / (EMA_WARMUP + t) until it reaches the configured decay
LEGACY_ARCH = "dcgan"  # the family of model files that do not name one


class FourierHead(nn.Module):
    """``count`` sinusoids ``A sin(2 pi f . p + phi + pi w(p))`` over the pixel grid ``p``, summed into 3 channels.

    Each sample's frequencies ``f`` (cycles per pixel), phases ``phi`` and RGB amplitudes ``A`` come from its
    latent and class through a small MLP, around fixed base frequencies spread over every angle and over
    periods from the image side down to 4 pixels (as the Fourier features of CIPS / StyleGAN3); ``w`` is a
    per-pixel phase map (the generator's last conv draws it) that bends the waves into grain and wavy bands.
    The generator adds the sum to its convolutional output before ``tanh``: an evenly spaced two-colour
    pattern at any angle (stripes; checks and dot lattices from two) is then a handful of numbers, where
    transposed convolutions from a 4 x 4 map must assemble it from local pieces.
    """

    def __init__(self, cond_dim: int, count: int, size: int, hidden: int = 128) -> None:
        super().__init__()
        self.count, self.side = count, size
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 6 * count))
        k = torch.arange(count, dtype=torch.float64)
        angle = math.pi * ((k * (math.sqrt(5) - 1) / 2) % 1.0)  # golden-ratio spread over [0, pi)
        period = size * (4.0 / size) ** ((k + 0.5) / count)  # log-spaced from ~size to ~4 pixels
        base = torch.stack([torch.cos(angle), torch.sin(angle)], 1) / period[:, None]
        self.register_buffer("base", base.float(), persistent=False)
        grid = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        xy = torch.stack(torch.meshgrid(grid, grid, indexing="xy")).flatten(1)
        self.register_buffer("grid", xy, persistent=False)  # (2, size * size) pixel coordinates from the centre

    def forward(self, cond: Tensor, warp: Tensor | None) -> Tensor:
        """``cond (B, cond_dim)``, ``warp (B, 1, size, size)`` (a phase shift per pixel, in half turns; ``None``:
        straight waves) -> ``(B, 3, size, size)`` in float32, computed without autocast (the sines' arguments
        reach tens of radians: beyond bf16)."""
        b, side = cond.shape[0], self.side
        with torch.autocast(cond.device.type, enabled=False):
            out = self.mlp(cond.float()).view(b, self.count, 6)  # fp32: bf16 offsets would shift the phases
            freq = (self.base + out[..., :2]) * (2 * math.pi)  # radians per pixel
            shift = math.pi * out[..., 2:3]
            if warp is not None:
                shift = shift + math.pi * warp.float().reshape(b, 1, side * side)
            waves = torch.sin(torch.baddbmm(shift, freq, self.grid.expand(b, -1, -1)))  # (B, count, side**2)
            return torch.bmm(out[..., 3:].transpose(1, 2), waves).view(b, 3, side, side)


class Generator(ImageGenerator):
    """``forward(z (B, z_dim), labels (B,)) -> images (B, 3, S, S)`` in [-1, 1].

    With ``fourier > 0`` a :class:`FourierHead` of that many sinusoids is added to the three colour maps before
    ``tanh``; with ``fourier_warp`` too, the last transposed conv draws a fourth map, the head's phase warp.
    """

    arch = "dcgan"

    def __init__(
        self,
        num_classes: int,
        z_dim: int,
        channels: int,
        image_size: int,
        fourier: int = 0,
        fourier_warp: bool = True,
        attention: int = 0,
    ) -> None:
        super().__init__()
        self.kwargs = {"num_classes": num_classes, "z_dim": z_dim, "channels": channels, "image_size": image_size}
        if fourier:
            self.kwargs["fourier"] = fourier
            if not fourier_warp:
                self.kwargs["fourier_warp"] = False
        if attention:
            self.kwargs["attention"] = attention
        warp = bool(fourier and fourier_warp)
        self.num_classes, self.z_dim, self.image_size = num_classes, z_dim, image_size
        self.net = nn.Sequential(*upsampling_stack(z_dim + num_classes, channels, image_size, 3 + warp, attention))
        self.fourier = FourierHead(z_dim + num_classes, fourier, image_size) if fourier else None
        self.fourier_warp = warp
        init_dcgan(self)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        cond = one_hot_input(z, labels, self.num_classes)
        x = self.net(cond[:, :, None, None])
        if self.fourier is not None:
            warp = x[:, 3:] if self.fourier_warp else None
            x = x[:, :3]
            x = x + self.fourier(cond, warp).to(x.dtype)
        return torch.tanh(x)


class Discriminator(nn.Module):
    """``forward(images (B, 3, S, S) in [-1, 1], labels (B,)) -> logits (B,)``.

    With a class head (``conditioning`` in :data:`CLASS_HEADS`), ``forward(..., with_classes=True)`` also
    returns its logits: (B, num_classes) for ``ac``; (B, 2 * num_classes) for ``adc`` (the real classes, then
    the generated ones).
    """

    def __init__(
        self,
        num_classes: int,
        channels: int,
        image_size: int,
        conditioning: Conditioning = "concat",
        spectral_norm: bool = False,
        batch_norm: bool = True,
        attention: int = 0,
    ) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, got {conditioning!r}")
        self.num_classes, self.conditioning = num_classes, conditioning
        side, _ = layout(image_size)
        sn = spectral(spectral_norm)
        c_in = 3 + (num_classes if conditioning == "concat" else 0)
        layers, width = downsampling_stack(c_in, channels, image_size, batch_norm, spectral_norm, attention)
        self.features = nn.Sequential(*layers)
        self.head = sn(nn.Conv2d(width, 1, side, 1, 0))
        self.embed = sn(nn.Embedding(num_classes, width)) if conditioning == "projection" else None
        heads = CLASS_HEADS.get(conditioning, 0)
        self.classifier = sn(nn.Linear(width, heads * num_classes)) if heads else None
        init_dcgan(self)

    def forward(self, images: Tensor, labels: Tensor, with_classes: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if with_classes and self.classifier is None:
            raise ValueError(f"class logits need a class head (conditioning {', '.join(CLASS_HEADS)})")
        if self.conditioning == "concat":
            images = with_class_maps(images, labels, self.num_classes)
        h = self.features(images)
        logits = self.head(h).flatten()
        if self.embed is not None:
            logits = logits + (self.embed(labels) * h.sum((2, 3))).sum(1)
        if with_classes:
            return logits, self.classifier(h.mean((2, 3)))
        return logits


GENERATORS: dict[str, type[ImageGenerator]] = {cls.arch: cls for cls in (Generator, ResNetGenerator, VaeDecoder)}


def build_generator(arch: str, **kwargs: Any) -> ImageGenerator:
    """The ``arch`` family's generator with its constructor ``kwargs`` (``num_classes``, ``z_dim``, ...)."""
    if arch not in GENERATORS:
        raise ValueError(f"unknown generator arch {arch!r}; expected one of {', '.join(GENERATORS)}")
    return GENERATORS[arch](**kwargs)


def same_architecture(generator: ImageGenerator) -> ImageGenerator:
    """A new generator of ``generator``'s family and constructor arguments (fresh weights from torch's RNG)."""
    return build_generator(generator.arch, **generator.kwargs)


def discriminator_batch_norm(gan: GanConfig) -> bool:
    """BatchNorm in D only without spectral norm and gradient penalties (as in SN-GAN, WGAN-GP, R1 papers).

    A penalty on the gradient w.r.t. one image is ill-defined when batch statistics tie every image's
    logit to the others (and its double backward would have to run through the cross-rank reduction).
    """
    return not gan.spectral_norm and gan.loss != "wgan-gp" and gan.r1_gamma == 0


def generator_from_config(gan: GanConfig, num_classes: int, image_size: int, arch: str | None = None) -> ImageGenerator:
    """The family ``arch`` (default ``gan.arch``) as the ``gan`` section configures it."""
    arch = arch or gan.arch
    kwargs: dict[str, Any] = {"num_classes": num_classes, "z_dim": gan.z_dim, "channels": gan.channels}
    kwargs |= {"image_size": image_size, "attention": gan.attention}
    if arch == "dcgan":
        kwargs |= {"fourier": gan.fourier, "fourier_warp": gan.fourier_warp}
    return build_generator(arch, **kwargs)


def discriminator_from_config(
    gan: GanConfig, num_classes: int, image_size: int, arch: str | None = None
) -> nn.Module | None:
    """The discriminator trained beside family ``arch`` (default ``gan.arch``): a residual one for ``resnet``, the
    DCGAN's for ``dcgan`` and for ``vae`` with an adversarial term (``gan.vae.adversarial > 0``), else ``None``."""
    arch = arch or gan.arch
    if arch == "vae" and gan.vae.adversarial == 0:
        return None
    if arch == "resnet":
        return ResNetDiscriminator(
            num_classes, gan.channels, image_size, gan.conditioning, gan.spectral_norm, gan.attention
        )
    return Discriminator(
        num_classes,
        gan.channels,
        image_size,
        conditioning=gan.conditioning,
        spectral_norm=gan.spectral_norm,
        batch_norm=discriminator_batch_norm(gan),
        attention=gan.attention,
    )


def encoder_from_config(gan: GanConfig, num_classes: int, image_size: int, arch: str | None = None) -> nn.Module | None:
    """The VAE's encoder for family ``vae`` (default ``gan.arch``); ``None`` for the GANs."""
    if (arch or gan.arch) != "vae":
        return None
    return VaeEncoder(num_classes, gan.z_dim, gan.channels, image_size)


class EMA:
    """Exponential moving average of a model's parameters; buffers (BatchNorm statistics) are copied.

    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` so the average is not dominated by the
    random initial weights during a short run.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold ``model``'s current weights in; ``step`` counts earlier updates (0 for the first)."""
        decay = min(self.decay, (1 + step) / (EMA_WARMUP + step))
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1.0 - decay)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)


class _Draws:
    """Random numbers for the rows ``offset:offset + rows`` of a global batch of ``total``.

    Every rank draws for the whole global batch from the same generator and keeps its own rows, so an
    augmented batch does not depend on how it is split across ranks.
    """

    def __init__(self, generator: torch.Generator, offset: int, rows: int, total: int, device: torch.device) -> None:
        self.generator, self.rows, self.total, self.device = generator, slice(offset, offset + rows), total, device

    def uniform(self) -> Tensor:
        return torch.rand(self.total, generator=self.generator)[self.rows].to(self.device)

    def integers(self, low: int, high: int) -> Tensor:
        return torch.randint(low, high, (self.total,), generator=self.generator)[self.rows].to(self.device)


def _color(x: Tensor, r: _Draws) -> Tensor:
    x = x + (r.uniform() - 0.5).view(-1, 1, 1, 1)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r.uniform() * 2).view(-1, 1, 1, 1) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r.uniform() + 0.5).view(-1, 1, 1, 1) + mean  # contrast


def _index_grid(*sizes: int, device: torch.device) -> tuple[Tensor, ...]:
    """Index tensors of a ``sizes`` grid (``meshgrid`` of aranges, "ij" order)."""
    return torch.meshgrid(*(torch.arange(n, device=device) for n in sizes), indexing="ij")


def _translation(x: Tensor, r: _Draws, ratio: float = 0.125) -> Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy, dx = r.integers(-sh, sh + 1).view(-1, 1, 1), r.integers(-sw, sw + 1).view(-1, 1, 1)
    gb, gy, gx = _index_grid(b, h, w, device=x.device)
    gy = (gy + dy + 1).clamp(0, h + 1)
    gx = (gx + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # zero border = mid-grey in [-1, 1]
    return padded[gb, gy, gx].permute(0, 3, 1, 2)


def _cutout(x: Tensor, r: _Draws, ratio: float = 0.5) -> Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy, ox = r.integers(0, h + (1 - ch % 2)).view(-1, 1, 1), r.integers(0, w + (1 - cw % 2)).view(-1, 1, 1)
    gb, gy, gx = _index_grid(b, ch, cw, device=x.device)
    gy = (gy + oy - ch // 2).clamp(0, h - 1)
    gx = (gx + ox - cw // 2).clamp(0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gy, gx] = 0
    return x * mask.unsqueeze(1)


_AUGMENT = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(
    x: Tensor, policy: Sequence[str], generator: torch.Generator, offset: int = 0, total: int | None = None
) -> Tensor:
    """DiffAugment: differentiable colour / translation / cutout on images in [-1, 1], in ``policy`` order.

    ``x`` holds rows ``offset:offset + len(x)`` of a global batch of ``total`` (default: all of it);
    the random draws are made for the global batch from ``generator``, so results are the same however
    the batch is split across ranks.
    """
    draws = _Draws(generator, offset, x.shape[0], total or x.shape[0], x.device)
    for name in policy:
        if name not in _AUGMENT:
            raise ValueError(f"unknown augmentation {name!r} (known: {', '.join(AUGMENTATIONS)})")
        x = _AUGMENT[name](x, draws)
    return x


def noise(n: int, z_dim: int, seed: int) -> Tensor:
    """The latent vectors ``generate_images`` uses for ``n`` samples and ``seed`` (on the CPU)."""
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate_from_noise(generator: ImageGenerator, z: Tensor, labels: Tensor, batch_size: int, device: Any) -> Tensor:
    """Images in [0, 1] (float, on the CPU) for latents ``z`` and ``labels``, in eval mode, in batches."""
    was_training = generator.training
    generator.eval()
    try:
        out = []
        for start in range(0, z.shape[0], batch_size):
            zb = z[start : start + batch_size].to(device)
            yb = labels[start : start + batch_size].to(device)
            out.append(generator(zb, yb).float().add(1).div(2).clamp(0, 1).cpu())
    finally:
        generator.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 3, generator.image_size, generator.image_size)


def generate_images(generator: ImageGenerator, labels: Tensor, seed: int, batch_size: int, device: Any) -> Tensor:
    """``(N, 3, H, W)`` float images in [0, 1] for class ``labels`` (N,); the same seed gives the same images."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return generate_from_noise(generator, noise(labels.shape[0], generator.z_dim, seed), labels, batch_size, device)


def sample_grid(generator: ImageGenerator, per_class: int, seed: int, device: Any, pad: int = 2) -> np.ndarray:
    """uint8 ``(H, W, 3)`` grid of generated samples: one row per class, ``per_class`` columns."""
    labels = torch.arange(generator.num_classes).repeat_interleave(per_class)
    images = generate_images(generator, labels, seed, batch_size=labels.shape[0], device=device)
    rows, side = generator.num_classes, generator.image_size
    grid = torch.ones(3, rows * (side + pad) + pad, per_class * (side + pad) + pad)
    for i, image in enumerate(images):
        r, c = divmod(i, per_class)
        y, x = pad + r * (side + pad), pad + c * (side + pad)
        grid[:, y : y + side, x : x + side] = image
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def _from_file_kwargs(arch: str = LEGACY_ARCH, **kwargs: Any) -> ImageGenerator:
    return build_generator(arch, **kwargs)


def save_generator(path: str | Path, generator: ImageGenerator, meta: dict[str, Any]) -> None:
    """The generator model file of any family (see :func:`pipeline.checkpoint.save_model`)."""
    checkpoint.save_model(path, generator, {"arch": generator.arch, **generator.kwargs}, meta)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[ImageGenerator, dict[str, Any]]:
    """The saved (EMA) generator, whatever its family, in eval mode on ``device``, and its meta (classes, step,
    val_fid, run_id, ...)."""
    model, meta = checkpoint.load_model(path, _from_file_kwargs, "generator model")  # type: ignore[arg-type]
    return model.to(device).eval(), meta
