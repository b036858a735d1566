"""The GAN's model maths, outside the loop: D and G losses, class-head and mode-seeking terms, and one step.

Every random draw of a step (latents, fake classes, augmentations) is made for the global batch from a
generator seeded by (seed, step) and sliced per rank, so with ``gan.sync_bn`` a step is the same computation
for any world size at the same ``gan.batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import GanConfig
from pipeline.distributed import DistEnv, plain_module
from pipeline.models.gan import CLASS_HEADS, EMA, diff_augment
from pipeline.training.loop import backward_and_step, derive_seed

STEP_STREAM = 0  # purpose of the derived seed of each step's draws
STEP_METRICS = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g")


def _set_requires_grad(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def d_loss(kind: str, real: Tensor, fake: Tensor, smoothing: float) -> Tensor:
    """Discriminator loss on real/fake logits; one-sided label smoothing for ``ns`` and ``ls``."""
    if kind == "ns":  # BCE with targets 1 - smoothing (real) and 0 (fake), written with softplus
        return (F.softplus(real) - (1.0 - smoothing) * real).mean() + F.softplus(fake).mean()
    if kind == "ls":
        return 0.5 * ((real - (1.0 - smoothing)) ** 2).mean() + 0.5 * (fake**2).mean()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "wgan-gp":
        return fake.mean() - real.mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def g_loss(kind: str, fake: Tensor) -> Tensor:
    """Generator loss on the discriminator's logits for generated images."""
    if kind == "ns":
        return F.softplus(-fake).mean()
    if kind == "ls":
        return 0.5 * ((fake - 1.0) ** 2).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake.mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def d_class_loss(kind: str, real: Tensor, labels: Tensor, fake: Tensor, y_fake: Tensor) -> Tensor:
    """D's class-head loss on the class logits of real images (``labels``) and generated ones (``y_fake``).

    ``ac`` (Odena et al. 2017) fits the real labels only; generated images are the head's test.
    ``adc`` (Hou et al. 2022) classifies into ``2K`` classes: real class ``k`` or generated class ``k``.
    """
    if kind == "ac":
        return F.cross_entropy(real, labels)
    if kind == "adc":
        return F.cross_entropy(real, labels) + F.cross_entropy(fake, y_fake + real.shape[1] // 2)
    raise ValueError(f"conditioning {kind!r} has no class head")


def g_class_loss(kind: str, fake: Tensor, y: Tensor) -> Tensor:
    """G's class-head loss on the class logits of its images for the classes ``y`` it was asked for.

    ``ac``: the class head must give them their class. Minimising that cross-entropy also lowers the
    conditional entropy of the generated classes, which pulls G to easily classified, alike images.
    ``adc`` adds the log-probability of "generated class y", which cancels that pull: G must make its
    images of class y indistinguishable from the real ones of class y, all of their variety included.
    """
    if kind == "ac":
        return F.cross_entropy(fake, y)
    if kind == "adc":
        return F.cross_entropy(fake, y) - F.cross_entropy(fake, y + fake.shape[1] // 2)
    raise ValueError(f"conditioning {kind!r} has no class head")


def mode_seeking_loss(images: Tensor, z: Tensor, eps: float = 1e-5) -> Tensor:
    """MSGAN (Mao et al. 2019) on the pairs of rows (0, 1), (2, 3), ...: mean of 1 / (image / latent distance).

    Each pair shares its class, so a generator that maps different latents of a class to alike images
    (mode collapse) pays for it. Mean absolute differences, as in the paper; a mean over pairs, so the
    mean of per-rank values is the global batch's when ranks hold whole pairs.
    """
    x, z = images.float().flatten(1), z.float()
    ratio = (x[0::2] - x[1::2]).abs().mean(1) / (z[0::2] - z[1::2]).abs().mean(1)
    return (1.0 / (ratio + eps)).mean()


def _input_gradient(logits: Tensor, inputs: Tensor, scaler: torch.amp.GradScaler) -> Tensor:
    """d logits / d inputs with its graph kept (for penalties); under fp16 through the scaler, then unscaled."""
    if not scaler.is_enabled():
        (grad,) = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
        return grad.flatten(1)
    (grad,) = torch.autograd.grad(scaler.scale(logits.float().sum()), inputs, create_graph=True)
    return grad.flatten(1) / scaler.get_scale()


@dataclass
class GanModels:
    """G and D (DDP-wrapped when distributed), the EMA generator and both optimisers."""

    g: nn.Module
    d: nn.Module
    ema: EMA
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler

    def state(self) -> dict[str, Any]:
        return {
            "g": plain_module(self.g).state_dict(),
            "d": plain_module(self.d).state_dict(),
            "g_ema": self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
        }

    def load(self, state: dict[str, Any]) -> None:
        plain_module(self.g).load_state_dict(state["g"])
        plain_module(self.d).load_state_dict(state["d"])
        self.ema.load_state_dict(state["g_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if state["scaler_g"]:
            self.scaler_g.load_state_dict(state["scaler_g"])
            self.scaler_d.load_state_dict(state["scaler_d"])


class GanStep:
    """One training step: ``gan.n_critic`` discriminator updates, then one generator update and the EMA.

    Called with this rank's real batches; returns this rank's detached scalars (:data:`STEP_METRICS`).
    """

    def __init__(
        self, gan: GanConfig, models: GanModels, env: DistEnv, num_classes: int, seed: int, channels_last: bool
    ) -> None:
        self.gan, self.m, self.env, self.num_classes, self.seed = gan, models, env, num_classes, seed
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, step: int, reals: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        gan, m, env = self.gan, self.m, self.env
        rows = reals[0][0].shape[0]
        total, offset = rows * env.world_size, rows * env.rank
        gen = torch.Generator().manual_seed(derive_seed(self.seed, STEP_STREAM, step))

        def draw_latents() -> tuple[Tensor, Tensor]:
            z = torch.randn(total, gan.z_dim, generator=gen)[offset : offset + rows]
            y = torch.randint(0, self.num_classes, (total,), generator=gen)
            if gan.mode_seeking > 0:
                y[1::2] = y[0::2]  # mode-seeking pairs: rows (2j, 2j + 1) share their class
            return z.to(env.device), y[offset : offset + rows].to(env.device)

        def augment(x: Tensor) -> Tensor:
            return diff_augment(x, gan.diffaug, gen, offset, total) if gan.diffaug else x

        def uniform() -> Tensor:
            return torch.rand(total, generator=gen)[offset : offset + rows].to(env.device)

        for i, (images, labels) in enumerate(reals):
            real = images.to(env.device, memory_format=self.fmt).mul(2).sub(1)
            z, y_fake = draw_latents()
            last = i == len(reals) - 1
            with env.autocast(), torch.set_grad_enabled(last):
                fake = m.g(z, y_fake)  # the last one keeps its graph for the generator update
            loss_d, d_real, d_fake, norm_d, skipped_d = self._d_update(
                augment(real), labels.to(env.device), augment(fake.detach()), y_fake, uniform
            )

        d_plain = plain_module(m.d)  # not the DDP wrapper: D's parameters get no gradient in this update
        _set_requires_grad(d_plain, False)
        try:
            with env.autocast():
                logits, classes = self._judge(d_plain, augment(fake), y_fake)
                loss_g = g_loss(gan.loss, logits)
            if classes is not None:  # G's images must carry their class for D's class head
                loss_g = loss_g + g_class_loss(gan.conditioning, classes, y_fake)
            if gan.mode_seeking > 0:
                loss_g = loss_g + gan.mode_seeking * mode_seeking_loss(fake, z)
            m.opt_g.zero_grad(set_to_none=True)
            norm_g, skipped_g = backward_and_step(loss_g, m.opt_g, m.scaler_g, m.g.parameters())
        finally:
            _set_requires_grad(d_plain, True)
        m.ema.update(plain_module(m.g), step)
        values = {
            "loss_d": loss_d.detach(),
            "loss_g": loss_g.detach(),
            "d_real": d_real,
            "d_fake": d_fake,
            "grad_norm_d": norm_d,
            "grad_norm_g": norm_g,
        }
        if skipped_g is not None and skipped_d is not None:  # fp16: the share of updates skipped for inf/NaN
            values["fp16_skipped"] = (skipped_g + skipped_d) / 2
        return values

    def _judge(self, d: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """D's real/fake logits and its class head's logits (``None`` without one), both float."""
        if self.gan.conditioning not in CLASS_HEADS:
            return d(images, labels).float(), None
        logits, classes = d(images, labels, with_classes=True)
        return logits.float(), classes.float()

    def _d_update(
        self, real: Tensor, labels: Tensor, fake: Tensor, y_fake: Tensor, uniform: Callable[[], Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        gan, m, env = self.gan, self.m, self.env
        if gan.r1_gamma > 0:
            real = real.detach().requires_grad_(True)
        with env.autocast():
            logits_real, classes_real = self._judge(m.d, real, labels)
            logits_fake, classes_fake = self._judge(m.d, fake, y_fake)
        loss = d_loss(gan.loss, logits_real, logits_fake, gan.label_smoothing)
        if classes_real is not None and classes_fake is not None:
            loss = loss + d_class_loss(gan.conditioning, classes_real, labels, classes_fake, y_fake)
        if gan.loss == "wgan-gp":
            alpha = uniform().view(-1, 1, 1, 1)
            mixed = (alpha * real.detach() + (1 - alpha) * fake).requires_grad_(True)
            with env.autocast():
                logits_mixed = m.d(mixed, labels)
            loss = (
                loss + gan.gp_lambda * ((_input_gradient(logits_mixed, mixed, m.scaler_d).norm(dim=1) - 1) ** 2).mean()
            )
        if gan.r1_gamma > 0:
            loss = loss + 0.5 * gan.r1_gamma * _input_gradient(logits_real, real, m.scaler_d).square().sum(1).mean()
        m.opt_d.zero_grad(set_to_none=True)
        norm, skipped = backward_and_step(loss, m.opt_d, m.scaler_d, m.d.parameters())
        return loss.detach(), logits_real.detach().mean(), logits_fake.detach().mean(), norm, skipped
