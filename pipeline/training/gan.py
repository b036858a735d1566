"""The conditional texture generators (``gan.arch``: the DCGAN, the residual GAN, the conditional VAE) as a task
of the one training loop: models, batches, val FID, outputs.

Distribution: G and D are each wrapped in DDP; the step's maths (:class:`GanStep`) draws every random
number for the global batch. With ``gan.sync_bn`` BatchNorm statistics span the global batch, so the
maths is the same for any world size at the same ``gan.batch_size``; without it (the default: ~1.6x the
step rate on 2 CPU ranks) each rank normalises its own rows and the loop averages the running statistics
before every evaluation, sample grid and checkpoint.

Validation: every ``gan.eval_every`` steps (and at step 0 and at the end) the EMA generator draws
``gan.eval_samples`` class-balanced samples from fixed latents; :mod:`pipeline.evaluation` turns them and
the val patches into FID, precision and recall, and the extractor's classifier into class fidelity (the share
of samples given their class). The lowest val FID's EMA weights are kept: ``out_dir/generator.pt``.

A VAE trains the same way, through :class:`VaeStep`: its decoder is the generator (EMA, validation, export),
its encoder shares the generator's optimiser, and a discriminator exists only for its optional GAN term.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline import checkpoint
from pipeline.config import Config, GanConfig
from pipeline.data.shards import MANIFEST, load_manifest
from pipeline.distributed import DistEnv, distributed
from pipeline.engine import GracefulStop, Session
from pipeline.errors import UserError
from pipeline.evaluation.features import load_extractor, real_features
from pipeline.evaluation.generator import class_fidelity, generated_features, val_generator_scores
from pipeline.images import png_bytes
from pipeline.models.gan import (
    EMA,
    ImageGenerator,
    discriminator_from_config,
    encoder_from_config,
    generator_from_config,
    noise,
    same_architecture,
    sample_grid,
    save_generator,
)
from pipeline.training.gan_loss import GanModels, GanStep, VaeStep
from pipeline.training.loop import (
    CHECKPOINT_FORMAT,
    Schedule,
    Task,
    derive_seed,
    place,
    rank_batches,
    run,
    seeded,
    wrap_ddp,
)

STAGE = "train_gan"
SECTIONS = ("data", "train", "gan")
GRID_COLUMNS = 8
_EVAL_STREAM, _GRID_STREAM, _INIT_STREAM = 1, 2, 3  # purposes of derived seeds (0: the step's draws)


def build_models(
    gan: GanConfig,
    num_classes: int,
    image_size: int,
    env: DistEnv,
    channels_last: bool,
    seed: int,
    compiled: bool = False,
) -> GanModels:
    """G, D and a VAE's encoder (DDP-wrapped when distributed; ``gan.arch`` picks them), EMA and optimisers;
    initial weights from the run seed."""

    def build() -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
        g = generator_from_config(gan, num_classes, image_size)
        d = discriminator_from_config(gan, num_classes, image_size)
        return g, d, encoder_from_config(gan, num_classes, image_size)

    def placed(module: nn.Module | None) -> nn.Module | None:
        return None if module is None else place(module, env, sync_bn=gan.sync_bn, channels_last=channels_last)

    def wrapped(module: nn.Module | None) -> nn.Module | None:
        return None if module is None else wrap_ddp(module, env, compiled)

    g, d, encoder = (placed(m) for m in seeded(derive_seed(seed, _INIT_STREAM), build))
    ema = EMA(g, gan.ema_decay)
    trained_with_g = [*g.parameters(), *(encoder.parameters() if encoder is not None else ())]
    opt_g = torch.optim.Adam(trained_with_g, lr=gan.lr_g, betas=(gan.beta1, gan.beta2))
    opt_d = None if d is None else torch.optim.Adam(d.parameters(), lr=gan.lr_d, betas=(gan.beta1, gan.beta2))
    return GanModels(wrapped(g), wrapped(d), ema, opt_g, opt_d, env.grad_scaler(), env.grad_scaler(), wrapped(encoder))


def check_gan_batch(gan: GanConfig, world_size: int) -> None:
    """The global batch must split evenly over the ranks (in row pairs with mode seeking)."""
    if gan.batch_size % world_size:
        raise UserError(f"gan.batch_size: {gan.batch_size} is not divisible by the world size {world_size}")
    if gan.mode_seeking > 0 and (gan.batch_size // world_size) % 2:
        raise UserError(
            f"gan.mode_seeking: needs an even batch per rank (pairs of rows), got gan.batch_size "
            f"{gan.batch_size} over {world_size} ranks"
        )


class GanTask(Task):
    """G and D trained by :class:`GanStep` (a VAE by :class:`VaeStep`); validated and exported through the EMA
    generator."""

    stage, sections, data_kind = STAGE, SECTIONS, "patches"
    best_metric = "val_fid"
    postfix = ("loss_d", "loss_g", "best_val_fid")

    def __init__(self, cfg: Config, shard_dir: Path, features_path: Path, out_dir: Path, env: DistEnv) -> None:
        gan = cfg.gan
        check_gan_batch(gan, env.world_size)
        manifest = load_manifest(shard_dir)
        self.cfg, self.env, self.shard_dir, self.out_dir = cfg, env, shard_dir, out_dir
        self.classes = list(manifest["classes"])
        patch_size = int(manifest["params"]["patch_size"])  # what the shards hold, whatever params.yaml says
        self.per_epoch = max(1, manifest["splits"]["train"]["patches"]["samples"] // gan.batch_size)
        self.sync_bn = gan.sync_bn
        self.schedule = Schedule(
            total=gan.steps,
            batch_size=gan.batch_size,
            log_every=gan.log_every,
            validate_every=gan.eval_every,
            checkpoint_every=gan.checkpoint_every,
            sample_every=gan.sample_every,
            validate_at_start=True,
        )
        train = cfg.train
        self.models = build_models(
            gan, len(self.classes), patch_size, env, train.channels_last, cfg.seed, train.compile
        )
        step_cls = VaeStep if gan.arch == "vae" else GanStep
        self.step_fn = step_cls(gan, self.models, env, len(self.classes), cfg.seed, cfg.train.channels_last)
        self.extractor, self.features_sha256 = load_extractor(features_path, self.classes, env.device)
        self.real, _ = real_features(self.extractor, shard_dir, "val", gan.batch_size, env)
        n = gan.eval_samples
        self.z = noise(n, gan.z_dim, derive_seed(cfg.seed, _EVAL_STREAM))
        self.labels = torch.arange(n) % len(self.classes)

    def batches(self, start: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
        gan = self.cfg.gan
        stream = rank_batches(
            self.cfg, self.env, self.shard_dir, "patches", gan.batch_size, self.per_epoch, start * gan.n_critic
        )
        while True:
            yield [next(stream) for _ in range(gan.n_critic)]

    def step(self, step: int, batch: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        values = self.step_fn(step, batch)
        return {k: values[k] for k in self.step_fn.metrics}

    def validate(self, step: int) -> dict[str, float]:
        ema = self.models.ema.module
        fake = generated_features(ema, self.extractor, self.z, self.labels, self.cfg.gan.batch_size, self.env)
        fidelity = class_fidelity(self.extractor, fake, self.labels, self.classes)["class_fidelity"]
        return val_generator_scores(self.real, fake, self.cfg.evaluate.knn_k) | {"val_class_fidelity": fidelity}

    def modules(self) -> list[nn.Module]:
        return [*self.models.modules().values(), self.models.ema.module]

    def weights(self) -> dict[str, Tensor]:
        return self.models.ema.state_dict()

    def state(self) -> dict[str, Any]:
        return self.models.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.models.load(state)

    @property
    def grid_seed(self) -> int:
        return derive_seed(self.cfg.seed, _GRID_STREAM)

    def sample(self, step: int) -> np.ndarray:
        return sample_grid(self.models.ema.module, GRID_COLUMNS, self.grid_seed, self.env.device)

    def _generator(self, weights: dict[str, Tensor]) -> ImageGenerator:
        generator = same_architecture(self.models.ema.module)
        generator.load_state_dict(weights)
        return generator

    def export(self, weights: dict[str, Tensor], meta: dict[str, Any]) -> None:
        save_generator(self.out_dir / "generator.pt", self._generator(weights), {"classes": self.classes} | meta)

    def finish(self, weights: dict[str, Tensor], meta: dict[str, Any]) -> list[Path]:
        """The best EMA generator and its sample grid."""
        self.export(weights, meta)
        samples = self.out_dir / "samples.png"
        grid = sample_grid(self._generator(weights), GRID_COLUMNS, self.grid_seed, "cpu")
        checkpoint.atomic_write_bytes(samples, png_bytes(grid))
        return [samples]


def train_gan(cfg: Config, shard_dir: Path, features_path: Path, out_dir: Path, ckpt_dir: Path) -> None:
    """Train under torchrun (or as one process); rank 0 writes generator.pt, run.json, history.csv, samples.png.

    Resumes from ``ckpt_dir/last.pt`` when it belongs to these params, data and feature extractor.
    """
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    with distributed(cfg.train) as env, GracefulStop() as stop:
        task = GanTask(cfg, shard_dir, Path(features_path), out_dir, env)
        fingerprint = f"{CHECKPOINT_FORMAT} features={task.features_sha256}"
        session = Session(cfg, STAGE, SECTIONS, env, Path(ckpt_dir), out_dir, shard_dir / MANIFEST, fingerprint)
        tags = {"fid_features.sha256": task.features_sha256, "model.arch": cfg.gan.arch}
        run(task, session, env, stop, tags=tags)
