"""The texture classifier whose features FID/KID are measured in, as a task of the one training loop.

Trained on the train patches only, in one process (the stage runs outside torchrun), deterministic from
``cfg.seed`` for a given number of torch threads (float sums depend on how work is split). The extractor
file records no run id, so the same params give the same file and the same sha256 (the GAN's checkpoints
and metrics name the extractor by it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.checkpoint import atomic_write_json
from pipeline.config import Config
from pipeline.data.augment import color_augment
from pipeline.data.shards import MANIFEST, load_manifest
from pipeline.distributed import DistEnv, distributed, seed_everything
from pipeline.engine import GracefulStop, Session
from pipeline.evaluation.features import classifier_accuracy
from pipeline.models.features import TextureFeatureNet, save_feature_extractor
from pipeline.tracking import file_sha256
from pipeline.training.loop import CHECKPOINT_FORMAT, Schedule, Task, place, rank_batches, run, seeded

STAGE = "train_fid_features"
SECTIONS = ("data", "train", "evaluate")
EXTRACTOR = "extractor.pt"
SUMMARY = "extractor.json"
LOG_EVERY = 25


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """All 8 symmetries of a square patch (textures have no "up"), then :func:`color_augment` per image.

    Palettes are drawn per source texture: with flips alone a classifier tells classes apart by the
    colours of its ~20 train sources per class.
    """
    b = images.shape[0]

    def coin() -> Tensor:
        return (torch.rand(b, generator=gen) < 0.5)[:, None, None, None]

    x = torch.where(coin(), images.flip(-1), images)
    x = torch.where(coin(), x.flip(-2), x)
    x = torch.where(coin(), x.transpose(-1, -2), x)
    return color_augment(x, gen)


class FeaturesTask(Task):
    """Cross-entropy on augmented train patches, AdamW with a one-cycle schedule; tested once at the end."""

    stage, sections, data_kind = STAGE, SECTIONS, "patches"
    postfix = ("loss",)

    def __init__(self, cfg: Config, shard_dir: Path, out_dir: Path, env: DistEnv) -> None:
        ev = cfg.evaluate
        self.cfg, self.env, self.shard_dir, self.out_dir = cfg, env, shard_dir, out_dir
        self.classes = list(load_manifest(shard_dir)["classes"])
        self.schedule = Schedule(total=ev.feature_steps, batch_size=ev.feature_batch_size, log_every=LOG_EVERY)
        model = seeded(seed_everything(cfg.seed), lambda: TextureFeatureNet(len(self.classes), ev.feature_dim))
        self.model = place(model, env, sync_bn=False, channels_last=cfg.train.channels_last)
        self.fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=ev.feature_lr, weight_decay=1e-4)
        self.lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=ev.feature_lr, total_steps=ev.feature_steps
        )
        self.gen = torch.Generator().manual_seed(cfg.seed)  # the augmentations' stream, saved in checkpoints
        self.loss_sum = 0.0

    def batches(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        ev = self.cfg.evaluate
        return rank_batches(
            self.cfg, self.env, self.shard_dir, "patches", ev.feature_batch_size, ev.feature_steps, start
        )

    def step(self, step: int, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images, labels = batch
        self.model.train()
        x = augment(images, self.gen).to(self.env.device).contiguous(memory_format=self.fmt)
        loss = F.cross_entropy(self.model(x), labels.to(self.env.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()
        self.loss_sum += loss.item()
        return {"loss": loss.detach()}

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def weights(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "augment_rng": self.gen.get_state(),
            "loss_sum": self.loss_sum,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.gen.set_state(state["augment_rng"])
        self.loss_sum = float(state["loss_sum"])

    def finish(self, weights: dict[str, Tensor], meta: dict[str, Any]) -> list[Path]:
        """``extractor.pt`` (no run id: the file depends on the params only) and ``extractor.json``."""
        ev = self.cfg.evaluate
        model = TextureFeatureNet(len(self.classes), ev.feature_dim)
        model.load_state_dict(weights)
        accuracy, tested = classifier_accuracy(model, self.shard_dir, "test", ev.batch_size)
        file_meta = {
            "classes": self.classes,
            "test_accuracy": accuracy,
            "steps": ev.feature_steps,
            "dim": ev.feature_dim,
            "params_hash": self.cfg.section_hash("data", "evaluate"),
        }
        save_feature_extractor(self.out_dir / EXTRACTOR, model, file_meta)
        self.summary = file_meta | {
            "sha256": file_sha256(self.out_dir / EXTRACTOR),
            "test_samples": tested,
            "train_loss": self.loss_sum / ev.feature_steps,
        }
        atomic_write_json(self.out_dir / SUMMARY, self.summary)
        return [self.out_dir / SUMMARY]


def train_feature_extractor(
    cfg: Config, shard_dir: Path, out_dir: Path, ckpt_dir: Path, progress: bool = True
) -> dict[str, Any]:
    """Train ``TextureFeatureNet`` on the train patches, test it, write ``extractor.pt`` + ``extractor.json``.

    Resumable from ``ckpt_dir/last.pt``; returns the summary written to ``extractor.json``.
    """
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    with distributed(cfg.train) as env, GracefulStop() as stop:
        task = FeaturesTask(cfg, shard_dir, out_dir, env)
        session = Session(cfg, STAGE, SECTIONS, env, Path(ckpt_dir), out_dir, shard_dir / MANIFEST, CHECKPOINT_FORMAT)
        run(task, session, env, stop, progress=progress)
    return task.summary
