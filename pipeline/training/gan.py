"""Train the conditional texture GAN under torchrun: DDP, EMA, periodic val FID (keep the best), resumable.

Distribution: G and D are each wrapped in DDP; every random draw of a step (latents, fake classes,
augmentations) is made for the global batch from a generator seeded by (seed, step) and sliced per rank.
With ``gan.sync_bn`` BatchNorm statistics span the global batch, so the math is the same for any world size
at the same ``gan.batch_size``; without it (the default: ~1.6x the step rate on 2 CPU ranks) each rank
normalises its own rows, and the ranks' running statistics are averaged before every evaluation, sample
grid and checkpoint, so all ranks evaluate and save one model. A resumed run continues where the
checkpoint left it.

Evaluation: every ``gan.eval_every`` steps (and at step 0 and at the end) the EMA generator draws
``gan.eval_samples`` class-balanced samples from fixed latents, sharded across ranks (sample i on rank
i % world_size); their features from the FID extractor are reduced to Gaussian statistics and gathered for
precision/recall, against the val patches' features computed once at start. The lowest val FID's EMA
weights are kept: ``out_dir/generator.pt``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import checkpoint
from pipeline.config import Config, GanConfig
from pipeline.data.loaders import eval_batches, train_stream
from pipeline.data.shards import load_manifest
from pipeline.distributed import (
    DistEnv,
    all_reduce_sum,
    average_buffers,
    convert_sync_batchnorm,
    distributed,
    plain_module,
)
from pipeline.engine import EXIT_STOPPED, GracefulStop, History, Session, Throughput, check_finite
from pipeline.errors import UserError
from pipeline.metrics.fid import GaussianStats, fid_from_stats, gather_features, precision_recall_coverage
from pipeline.models.features import load_feature_extractor
from pipeline.models.gan import (
    CLASS_HEADS,
    EMA,
    Discriminator,
    Generator,
    diff_augment,
    generate_from_noise,
    noise,
    sample_grid,
)
from pipeline.models.gan import save_generator as _save_generator

STAGE = "train_gan"
SECTIONS = ("data", "train", "gan")
GRID_COLUMNS = 8
_STEP_STREAM, _EVAL_STREAM, _GRID_STREAM, _INIT_STREAM = 0, 1, 2, 3  # purposes of derived seeds
STEP_METRICS = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g")


def derive_seed(seed: int, *words: int) -> int:
    """A 63-bit seed for one purpose (and step) derived from the run's seed."""
    return int(np.random.SeedSequence([seed, *words]).generate_state(2, np.uint64)[0] >> np.uint64(1))


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


def _input_gradient(logits: Tensor, inputs: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
    return grad.flatten(1)


@dataclass
class GanModels:
    """G and D (DDP-wrapped when distributed), the EMA generator and both optimisers."""

    g: nn.Module
    d: nn.Module
    ema: EMA
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer

    def state(self) -> dict[str, Any]:
        return {
            "g": plain_module(self.g).state_dict(),
            "d": plain_module(self.d).state_dict(),
            "g_ema": self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }

    def load(self, state: dict[str, Any]) -> None:
        plain_module(self.g).load_state_dict(state["g"])
        plain_module(self.d).load_state_dict(state["d"])
        self.ema.load_state_dict(state["g_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])


def _discriminator_batch_norm(gan: GanConfig) -> bool:
    """BatchNorm in D only without spectral norm and gradient penalties (as in SN-GAN, WGAN-GP, R1 papers).

    A penalty on the gradient w.r.t. one image is ill-defined when batch statistics tie every image's
    logit to the others (and its double backward would have to run through the cross-rank reduction).
    """
    return not gan.spectral_norm and gan.loss != "wgan-gp" and gan.r1_gamma == 0


def build_models(
    gan: GanConfig, num_classes: int, image_size: int, env: DistEnv, channels_last: bool, seed: int
) -> GanModels:
    """G, D (DDP-wrapped when distributed), EMA and optimisers; initial weights drawn from ``seed`` in a forked
    RNG, so they are the same on every rank and for every world size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _INIT_STREAM))
        g = Generator(num_classes, gan.z_dim, gan.channels, image_size, gan.fourier, gan.fourier_warp)
        d = Discriminator(
            num_classes,
            gan.channels,
            image_size,
            conditioning=gan.conditioning,
            spectral_norm=gan.spectral_norm,
            batch_norm=_discriminator_batch_norm(gan),
        )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if env.distributed and gan.sync_bn:
        g, d = convert_sync_batchnorm(g, env.device), convert_sync_batchnorm(d, env.device)
    g = g.to(env.device, memory_format=fmt)
    d = d.to(env.device, memory_format=fmt)
    ema = EMA(g, gan.ema_decay)
    opt_g = torch.optim.Adam(g.parameters(), lr=gan.lr_g, betas=(gan.beta1, gan.beta2))
    opt_d = torch.optim.Adam(d.parameters(), lr=gan.lr_d, betas=(gan.beta1, gan.beta2))
    if env.distributed:
        # Running statistics are only read in eval mode, after _GanRun.settle (or synchronised by SyncBN);
        # spectral-norm vectors follow identical weights. So DDP need not broadcast buffers at each forward.
        ids = [env.device.index] if env.device.type == "cuda" else None
        g = DDP(g, device_ids=ids, forward_sync_buffers=False)
        d = DDP(d, device_ids=ids, forward_sync_buffers=False)
    return GanModels(g, d, ema, opt_g, opt_d)


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
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _STEP_STREAM, step))

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
            loss_d, d_real, d_fake, norm_d = self._d_update(
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
            loss_g.backward()
            norm_g = torch.nn.utils.get_total_norm([p.grad for p in m.g.parameters() if p.grad is not None])
            m.opt_g.step()
        finally:
            _set_requires_grad(d_plain, True)
        m.ema.update(plain_module(m.g), step)
        return {
            "loss_d": loss_d.detach(),
            "loss_g": loss_g.detach(),
            "d_real": d_real,
            "d_fake": d_fake,
            "grad_norm_d": norm_d,
            "grad_norm_g": norm_g.detach(),
        }

    def _judge(self, d: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """D's real/fake logits and its class head's logits (``None`` without one), both float."""
        if self.gan.conditioning not in CLASS_HEADS:
            return d(images, labels).float(), None
        logits, classes = d(images, labels, with_classes=True)
        return logits.float(), classes.float()

    def _d_update(
        self, real: Tensor, labels: Tensor, fake: Tensor, y_fake: Tensor, uniform: Callable[[], Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
            loss = loss + gan.gp_lambda * ((_input_gradient(logits_mixed, mixed).norm(dim=1) - 1) ** 2).mean()
        if gan.r1_gamma > 0:
            loss = loss + 0.5 * gan.r1_gamma * _input_gradient(logits_real, real).square().sum(1).mean()
        m.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in m.d.parameters() if p.grad is not None])
        m.opt_d.step()
        return loss.detach(), logits_real.detach().mean(), logits_fake.detach().mean(), norm.detach()


class ValEvaluator:
    """Quick FID / precision / recall of a generator against the val patches, sharded across ranks."""

    def __init__(
        self, cfg: Config, shard_dir: Path, features_path: Path, env: DistEnv, classes: list[str], z_dim: int
    ) -> None:
        self.env, self.batch_size, self.knn_k = env, cfg.gan.batch_size, cfg.evaluate.knn_k
        self.extractor, meta = load_feature_extractor(features_path, env.device)
        if meta.get("classes", classes) != classes:
            raise UserError(f"{features_path}: feature extractor was trained on other classes than {shard_dir}")
        self.features_sha256 = meta["sha256"]
        local = [
            self._features(images)
            for images, _ in eval_batches(
                shard_dir, "patches", "val", self.batch_size, rank=env.rank, world_size=env.world_size
            )
        ]
        real = torch.cat(local)
        self.real_stats = GaussianStats(real.shape[1])
        self.real_stats.update(real)
        self.real_stats.all_reduce()
        self.real = gather_features(real)
        n = cfg.gan.eval_samples
        rows = slice(env.rank, None, env.world_size)  # sample i on rank i % world_size, as gather_features expects
        self.z = noise(n, z_dim, derive_seed(cfg.seed, _EVAL_STREAM))[rows]
        self.labels = (torch.arange(n) % len(classes))[rows]

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:
        return self.extractor(images.to(self.env.device)).float().cpu()

    def __call__(self, generator: Generator) -> dict[str, float]:
        images = generate_from_noise(generator, self.z, self.labels, self.batch_size, self.env.device)
        fake = torch.cat([self._features(b) for b in images.split(self.batch_size)])
        stats = GaussianStats(fake.shape[1])
        stats.update(fake)
        stats.all_reduce()
        prc = precision_recall_coverage(self.real, gather_features(fake), self.knn_k)
        fid = fid_from_stats(self.real_stats, stats)
        return {"val_fid": fid, "val_precision": prc["precision"], "val_recall": prc["recall"]}


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class _Window:
    """Per-step metrics averaged over a logging window."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def flush(self) -> dict[str, float]:
        out = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return out


def reduce_metrics(values: dict[str, Tensor], world_size: int) -> dict[str, float]:
    """Per-rank scalars averaged over ranks in one collective (every rank gets the same numbers)."""
    packed = torch.stack([values[k].float() for k in STEP_METRICS]).to(torch.float64)
    means = (all_reduce_sum(packed) / world_size).tolist()
    return dict(zip(STEP_METRICS, means, strict=True))


def _check_resumable(ckpt: dict[str, Any] | None, session: Session, features_sha256: str) -> dict[str, Any] | None:
    """A checkpoint evaluated with another feature extractor is treated like one from other params."""
    if ckpt is None or ckpt.get("features_sha256") == features_sha256:
        return ckpt
    if session.cfg.train.on_params_change == "error":
        raise checkpoint.CheckpointError(
            f"{session.last_path}: checkpoint was evaluated with another feature extractor; "
            "delete it or set train.on_params_change: restart"
        )
    session.print(f"{STAGE}: feature extractor changed, starting afresh")
    session.run_id = None
    return None


class _GanRun:
    """One execution of the stage on this rank: models, evaluator, session, resume state, the loop, outputs."""

    def __init__(self, cfg: Config, shard_dir: Path, features_path: Path, out_dir: Path, ckpt_dir: Path, env: DistEnv):
        gan = cfg.gan
        if gan.batch_size % env.world_size:
            raise UserError(f"gan.batch_size: {gan.batch_size} is not divisible by the world size {env.world_size}")
        if gan.mode_seeking > 0 and (gan.batch_size // env.world_size) % 2:
            raise UserError(
                f"gan.mode_seeking: needs an even batch per rank (pairs of rows), got gan.batch_size "
                f"{gan.batch_size} over {env.world_size} ranks"
            )
        manifest = load_manifest(shard_dir)
        self.cfg, self.env, self.shard_dir = cfg, env, shard_dir
        self.classes = list(manifest["classes"])
        self.patch_size = int(manifest["params"]["patch_size"])  # what the shards hold, whatever params.yaml says
        self.per_epoch = max(1, manifest["splits"]["train"]["patches"]["samples"] // gan.batch_size)
        self.session = Session(cfg, STAGE, SECTIONS, env, ckpt_dir, out_dir, shard_dir / "manifest.json")
        self.models = build_models(gan, len(self.classes), self.patch_size, env, cfg.train.channels_last, cfg.seed)
        self.evaluate = ValEvaluator(cfg, shard_dir, features_path, env, self.classes, gan.z_dim)
        ckpt = _check_resumable(self.session.resume(), self.session, self.evaluate.features_sha256)
        self.start = 0 if ckpt is None else int(ckpt["step"])
        self.history = History(None if ckpt is None else ckpt["history"])
        self.best: dict[str, Any] | None = None if ckpt is None else ckpt["best"]
        if ckpt is not None:
            self.models.load(ckpt)
        self.session.start_run(tags={"fid_features.sha256": self.evaluate.features_sha256})
        self.step_fn = GanStep(gan, self.models, env, len(self.classes), cfg.seed, cfg.train.channels_last)

    def state(self) -> dict[str, Any]:
        extra = {"history": self.history.rows, "best": self.best, "features_sha256": self.evaluate.features_sha256}
        return self.models.state() | extra

    def settle(self) -> None:
        """One model on every rank: per-rank BatchNorm running statistics averaged (G, D, EMA); all ranks call it."""
        if self.env.distributed and not self.cfg.gan.sync_bn:
            for module in (plain_module(self.models.g), plain_module(self.models.d), self.models.ema.module):
                average_buffers(module)

    def run_eval(self, step: int) -> dict[str, float]:
        """Val metrics of the EMA generator; a new best is kept (and written by rank 0).

        All ranks call it, after :meth:`settle` (at step 0 the ranks' fresh models agree already).
        """
        ema = self.models.ema
        result = self.evaluate(ema.module)
        if self.best is None or result["val_fid"] < self.best["val_fid"]:
            weights = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
            self.best = {"step": step, "val_fid": result["val_fid"], "state": weights}
            if self.env.is_main:
                self._write_generator(ema.module)
        return result | {"best_val_fid": self.best["val_fid"], "best_step": self.best["step"]}

    def _write_generator(self, generator: Generator) -> None:
        meta = {"classes": self.classes, "step": self.best["step"], "val_fid": self.best["val_fid"]}
        _save_generator(self.session.out_dir / "generator.pt", generator, meta | {"run_id": self.session.run_id})

    def train(self, stop: GracefulStop) -> None:
        cfg, gan, env, session = self.cfg, self.cfg.gan, self.env, self.session
        if self.start == 0:
            row = self.run_eval(0)  # the untrained generator: the baseline later FIDs are read against
            self.history.append(0, row)
            session.logger.log_metrics(row, 0)
            session.save(self.state(), 0)
        rows = gan.batch_size // env.world_size
        batches = train_stream(
            self.shard_dir,
            "patches",
            rows,
            self.per_epoch,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=cfg.train.num_workers,
            seed=cfg.seed,
            start=self.start * gan.n_critic,
        )
        window, throughput = _Window(), Throughput()
        with session.progress(gan.steps, self.start, STAGE) as bar:
            for step in range(self.start + 1, gan.steps + 1):
                reals = [next(batches) for _ in range(gan.n_critic)]
                values = reduce_metrics(self.step_fn(step - 1, reals), env.world_size)
                check_finite(values, step, session.last_path)
                window.add(values)
                throughput.add(gan.batch_size)
                bar.update(1)
                row: dict[str, float] = {}
                if step % gan.log_every == 0 or step == gan.steps:
                    row |= window.flush() | {"samples_per_s": throughput.rate()}
                evaluating = step % gan.eval_every == 0 or step == gan.steps
                sampling = step % gan.sample_every == 0
                saving = step % gan.checkpoint_every == 0 or step == gan.steps
                if evaluating or sampling or saving:
                    self.settle()
                if evaluating:
                    row |= self.run_eval(step)
                if row:
                    self.history.append(step, row)
                    session.logger.log_metrics(row, step)
                    bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss_d", "loss_g", "best_val_fid") if k in row})
                if env.is_main and sampling:
                    grid = sample_grid(self.models.ema.module, GRID_COLUMNS, self.grid_seed, env.device)
                    session.logger.log_image(grid, f"samples/step_{step:06d}.png")
                if saving:
                    session.save(self.state(), step)
                if stop.should_stop(env.device):
                    self.settle()
                    session.save(self.state(), step)
                    session.print(f"{STAGE}: stopped at step {step}; checkpoint saved to {session.last_path}")
                    session.logger.end("KILLED")
                    raise SystemExit(EXIT_STOPPED)

    @property
    def grid_seed(self) -> int:
        return derive_seed(self.cfg.seed, _GRID_STREAM)

    def finish(self) -> None:
        """Rank 0: the best EMA generator, its sample grid, the history and the run record."""
        session = self.session
        if self.env.is_main:
            generator = Generator(**self.models.ema.module.kwargs)
            generator.load_state_dict(self.best["state"])
            self._write_generator(generator)
            samples = session.out_dir / "samples.png"
            checkpoint.atomic_write_bytes(samples, _png(sample_grid(generator, GRID_COLUMNS, self.grid_seed, "cpu")))
            self.history.write_csv(session.out_dir / "history.csv")
            session.write_run_json()
            session.logger.log_artifact(samples)
            session.logger.log_artifact(session.out_dir / "history.csv")
        session.logger.end()


def train_gan(cfg: Config, shard_dir: Path, features_path: Path, out_dir: Path, ckpt_dir: Path) -> None:
    """Train under torchrun (or as one process); rank 0 writes generator.pt, run.json, history.csv, samples.png.

    Resumes from ``ckpt_dir/last.pt`` when it belongs to these params, data and feature extractor.
    SIGTERM/SIGINT: checkpoint, exit 143. A non-finite loss: :class:`NonFiniteLossError`, checkpoint kept.
    """
    with distributed(cfg.train) as env, GracefulStop() as stop:
        run = _GanRun(cfg, Path(shard_dir), Path(features_path), Path(out_dir), Path(ckpt_dir), env)
        try:
            run.train(stop)
        except Exception:
            run.session.logger.end("FAILED")
            raise
        run.finish()
