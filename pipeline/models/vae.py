"""Conditional VAE (Kingma & Welling 2014; conditional: Sohn et al. 2015): ``gan.arch: vae``.

- :class:`VaeEncoder`: the image with one-hot class maps through DCGAN discriminator-style strided convs,
  then a linear layer to the posterior's mean and log-variance over ``z``.
- :class:`VaeDecoder`: ``[z, one_hot(class)]`` through DCGAN generator-style transposed convs to ``tanh``
  images: the generator that is evaluated, registered and served (the :class:`ImageGenerator` interface,
  latents drawn from the prior N(0, I)), exactly as a GAN's generator.
- :func:`kl_divergence`: KL(q(z | x, y) || N(0, I)) per image; the trainer's ELBO adds it, weighted by
  ``gan.vae.kl_weight``, to the per-image squared reconstruction error (and, with ``gan.vae.adversarial``, a
  GAN term on the decoder's prior samples: VAE-GAN, Larsen et al. 2016).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.models.gan_blocks import (
    ImageGenerator,
    downsampling_stack,
    init_dcgan,
    layout,
    one_hot_input,
    upsampling_stack,
    with_class_maps,
)


class VaeDecoder(ImageGenerator):
    """``forward(z (B, z_dim), labels (B,)) -> images (B, 3, S, S)`` in [-1, 1]."""

    arch = "vae"

    def __init__(self, num_classes: int, z_dim: int, channels: int, image_size: int, attention: int = 0) -> None:
        super().__init__()
        self.kwargs = {"num_classes": num_classes, "z_dim": z_dim, "channels": channels, "image_size": image_size}
        if attention:
            self.kwargs["attention"] = attention
        self.num_classes, self.z_dim, self.image_size = num_classes, z_dim, image_size
        self.net = nn.Sequential(*upsampling_stack(z_dim + num_classes, channels, image_size, 3, attention))
        init_dcgan(self)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        return torch.tanh(self.net(one_hot_input(z, labels, self.num_classes)[:, :, None, None]))


class VaeEncoder(nn.Module):
    """``forward(images (B, 3, S, S) in [-1, 1], labels (B,)) -> (mean, log-variance)``, each (B, z_dim)."""

    def __init__(self, num_classes: int, z_dim: int, channels: int, image_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers, width = downsampling_stack(3 + num_classes, channels, image_size, True, False)
        self.features = nn.Sequential(*layers)
        side, _ = layout(image_size)
        self.posterior = nn.Linear(width * side * side, 2 * z_dim)
        init_dcgan(self)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(with_class_maps(images, labels, self.num_classes))
        mean, log_var = self.posterior(h.flatten(1)).chunk(2, dim=1)
        return mean, log_var


def kl_divergence(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) summed over latent dimensions, averaged over rows (float32)."""
    mean, log_var = mean.float(), log_var.float()
    return (0.5 * (mean.square() + log_var.exp() - 1.0 - log_var)).sum(1).mean()
