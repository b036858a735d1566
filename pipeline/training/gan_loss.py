"""The generators' model maths, outside the loop: D and G losses, class-head and mode-seeking terms, one GAN
step (:class:`GanStep`) and one VAE step (:class:`VaeStep`: the ELBO, optionally with a GAN term).

Every random draw of a step (latents, fake classes, augmentations) is made for the global batch from a
generator seeded by (seed, step) and sliced per rank, so with ``gan.sync_bn`` a step is the same computation
for any world size at the same ``gan.batch_size``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import GanConfig
from pipeline.distributed import DistEnv, plain_module
from pipeline.models.gan import EMA, diff_augment
from pipeline.models.gan_blocks import CLASS_HEADS
from pipeline.models.vae import kl_divergence
from pipeline.training.loop import backward_and_step, derive_seed

STEP_STREAM = 0  # purpose of the derived seed of each step's draws
D_METRICS = ("loss_d", "d_real", "d_fake", "grad_norm_d")
STEP_METRICS = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g")
VAE_METRICS = ("loss_g", "recon", "kl", "grad_norm_g")  # loss_g: the encoder's and decoder's whole loss


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
    """G and D (DDP-wrapped when distributed), the EMA generator and the optimisers.

    A VAE's G is its decoder, trained with its ``encoder`` by ``opt_g``; a plain VAE has no D (``d``, ``opt_d``
    ``None``).
    """

    g: nn.Module
    d: nn.Module | None
    ema: EMA
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    encoder: nn.Module | None = None

    def modules(self) -> dict[str, nn.Module]:
        """The trained modules by checkpoint key (DDP wrappers removed)."""
        found = {"g": self.g, "d": self.d, "encoder": self.encoder}
        return {k: plain_module(m) for k, m in found.items() if m is not None}

    def state(self) -> dict[str, Any]:
        state = {k: m.state_dict() for k, m in self.modules().items()}
        state |= {"g_ema": self.ema.state_dict(), "opt_g": self.opt_g.state_dict()}
        state |= {"scaler_g": self.scaler_g.state_dict(), "scaler_d": self.scaler_d.state_dict()}
        if self.opt_d is not None:
            state["opt_d"] = self.opt_d.state_dict()
        return state

    def load(self, state: dict[str, Any]) -> None:
        for key, module in self.modules().items():
            module.load_state_dict(state[key])
        self.ema.load_state_dict(state["g_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.opt_d is not None:
            self.opt_d.load_state_dict(state["opt_d"])
        if state["scaler_g"]:
            self.scaler_g.load_state_dict(state["scaler_g"])
            self.scaler_d.load_state_dict(state["scaler_d"])


class _StepDraws:
    """Every random draw of one step, made for the global batch from one generator seeded by (seed, step),
    and this rank's rows of it."""

    def __init__(self, gan: GanConfig, env: DistEnv, num_classes: int, seed: int, step: int, rows: int) -> None:
        self.gan, self.env, self.num_classes, self.rows = gan, env, num_classes, rows
        self.total, self.offset = rows * env.world_size, rows * env.rank
        self.gen = torch.Generator().manual_seed(derive_seed(seed, STEP_STREAM, step))

    def _mine(self, x: Tensor) -> Tensor:
        return x[self.offset : self.offset + self.rows].to(self.env.device)

    def normal(self, dim: int) -> Tensor:
        return self._mine(torch.randn(self.total, dim, generator=self.gen))

    def latents(self) -> tuple[Tensor, Tensor]:
        """Latents and classes for generated rows (mode-seeking pairs of rows share their class)."""
        z = self.normal(self.gan.z_dim)
        y = torch.randint(0, self.num_classes, (self.total,), generator=self.gen)
        if self.gan.mode_seeking > 0:
            y[1::2] = y[0::2]  # mode-seeking pairs: rows (2j, 2j + 1) share their class
        return z, self._mine(y)

    def augment(self, x: Tensor) -> Tensor:
        return diff_augment(x, self.gan.diffaug, self.gen, self.offset, self.total) if self.gan.diffaug else x

    def uniform(self) -> Tensor:
        return self._mine(torch.rand(self.total, generator=self.gen))


class GanStep:
    """One training step: ``gan.n_critic`` discriminator updates, then one generator update and the EMA.

    Called with this rank's real batches; returns this rank's detached scalars (:attr:`metrics`).
    """

    metrics = STEP_METRICS

    def __init__(
        self, gan: GanConfig, models: GanModels, env: DistEnv, num_classes: int, seed: int, channels_last: bool
    ) -> None:
        self.gan, self.m, self.env, self.num_classes, self.seed = gan, models, env, num_classes, seed
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def _draws(self, step: int, reals: list[tuple[Tensor, Tensor]]) -> _StepDraws:
        return _StepDraws(self.gan, self.env, self.num_classes, self.seed, step, reals[0][0].shape[0])

    def _real(self, images: Tensor) -> Tensor:
        return images.to(self.env.device, memory_format=self.fmt).mul(2).sub(1)

    def __call__(self, step: int, reals: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        m, env = self.m, self.env
        draws = self._draws(step, reals)
        for i, (images, labels) in enumerate(reals):
            real = self._real(images)
            z, y_fake = draws.latents()
            last = i == len(reals) - 1
            with env.autocast(), torch.set_grad_enabled(last):
                fake = m.g(z, y_fake)  # the last one keeps its graph for the generator update
            d_values = self._d_update(
                draws.augment(real), labels.to(env.device), draws.augment(fake.detach()), y_fake, draws.uniform
            )
        with self._frozen_d() as d:
            loss_g = self._adversarial_g_loss(d, draws, fake, z, y_fake)
            m.opt_g.zero_grad(set_to_none=True)
            norm_g, skipped_g = backward_and_step(loss_g, m.opt_g, m.scaler_g, m.g.parameters())
        m.ema.update(plain_module(m.g), step)
        values = d_values | {"loss_g": loss_g.detach(), "grad_norm_g": norm_g}
        skipped_d = values.pop("skipped_d")
        if skipped_g is not None and skipped_d is not None:  # fp16: the share of updates skipped for inf/NaN
            values["fp16_skipped"] = (skipped_g + skipped_d) / 2
        return values

    @contextlib.contextmanager
    def _frozen_d(self) -> Iterator[nn.Module | None]:
        """D without the DDP wrapper and without gradients, for the generator's update (``None``: no D)."""
        if self.m.d is None:
            yield None
            return
        d_plain = plain_module(self.m.d)
        _set_requires_grad(d_plain, False)
        try:
            yield d_plain
        finally:
            _set_requires_grad(d_plain, True)

    def _adversarial_g_loss(self, d: nn.Module, draws: _StepDraws, fake: Tensor, z: Tensor, y_fake: Tensor) -> Tensor:
        """G's loss on the frozen ``d``'s judgement of its images, with the class-head and mode-seeking terms."""
        gan = self.gan
        with self.env.autocast():
            logits, classes = self._judge(d, draws.augment(fake), y_fake)
            loss = g_loss(gan.loss, logits)
        if classes is not None:  # G's images must carry their class for D's class head
            loss = loss + g_class_loss(gan.conditioning, classes, y_fake)
        if gan.mode_seeking > 0:
            loss = loss + gan.mode_seeking * mode_seeking_loss(fake, z)
        return loss

    def _judge(self, d: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """D's real/fake logits and its class head's logits (``None`` without one), both float."""
        if self.gan.conditioning not in CLASS_HEADS:
            return d(images, labels).float(), None
        logits, classes = d(images, labels, with_classes=True)
        return logits.float(), classes.float()

    def _d_update(
        self, real: Tensor, labels: Tensor, fake: Tensor, y_fake: Tensor, uniform: Callable[[], Tensor]
    ) -> dict[str, Tensor | None]:
        """One D update; its :data:`D_METRICS` and ``skipped_d`` (fp16's skip flag, ``None`` without fp16)."""
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
        return {
            "loss_d": loss.detach(),
            "d_real": logits_real.detach().mean(),
            "d_fake": logits_fake.detach().mean(),
            "grad_norm_d": norm,
            "skipped_d": skipped,
        }


class VaeStep(GanStep):
    """One step of the conditional VAE: with a GAN term (``gan.vae.adversarial > 0``) first ``gan.n_critic`` D
    updates on the decoder's prior samples; then one update of encoder and decoder on the last batch, and the EMA.

    The decoder makes the reconstructions and the prior samples in one forward pass (one batch of statistics
    for its BatchNorm, one DDP forward). Loss per image: squared error of the reconstruction (images in
    [-1, 1]) + ``kl_weight`` x KL(q(z | x, y) || N(0, I)) [+ ``adversarial`` x the GAN generator loss].
    """

    def __init__(
        self, gan: GanConfig, models: GanModels, env: DistEnv, num_classes: int, seed: int, channels_last: bool
    ) -> None:
        super().__init__(gan, models, env, num_classes, seed, channels_last)
        self.adversarial = gan.vae.adversarial > 0
        self.metrics = VAE_METRICS + (D_METRICS if self.adversarial else ())

    def __call__(self, step: int, reals: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        gan, m, env = self.gan, self.m, self.env
        draws = self._draws(step, reals)
        values: dict[str, Tensor | None] = {"skipped_d": None}
        for i, (images, labels) in enumerate(reals):
            real, labels = self._real(images), labels.to(env.device)
            eps = draws.normal(gan.z_dim)
            z, y_fake = draws.latents()
            if i == len(reals) - 1:
                with env.autocast():
                    mean, log_var = m.encoder(real, labels)
                    z_post = mean + eps * (0.5 * log_var).exp()
                    out = m.g(torch.cat([z_post, z]), torch.cat([labels, y_fake]))
                recon, fake = out[: real.shape[0]], out[real.shape[0] :]
            elif self.adversarial:
                with env.autocast(), torch.no_grad():
                    fake = m.g(z, y_fake)
            if self.adversarial:
                values = self._d_update(
                    draws.augment(real), labels, draws.augment(fake.detach()), y_fake, draws.uniform
                )
        recon_loss = (recon.float() - real.float()).square().flatten(1).sum(1).mean()
        kl = kl_divergence(mean, log_var)
        loss = recon_loss + gan.vae.kl_weight * kl
        with self._frozen_d() as d:
            if d is not None:
                loss = loss + gan.vae.adversarial * self._adversarial_g_loss(d, draws, fake, z, y_fake)
            m.opt_g.zero_grad(set_to_none=True)
            params = [*m.g.parameters(), *m.encoder.parameters()]
            norm_g, skipped_g = backward_and_step(loss, m.opt_g, m.scaler_g, iter(params))
        m.ema.update(plain_module(m.g), step)
        skipped_d = values.pop("skipped_d")
        values |= {"loss_g": loss.detach(), "recon": recon_loss.detach(), "kl": kl.detach(), "grad_norm_g": norm_g}
        if skipped_g is not None:  # fp16: the share of updates skipped for inf/NaN
            values["fp16_skipped"] = skipped_g if skipped_d is None else (skipped_g + skipped_d) / 2
        return values  # type: ignore[return-value]
