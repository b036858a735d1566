"""The texture segmenter as a task of the one training loop: model, augmented batches, per-epoch validation.

Distribution: each rank trains on ``segmenter.batch_size / world_size`` mosaics per step from its own
shards. With ``segmenter.sync_bn`` BatchNorm statistics span the global batch and, the loss being a mean
over images and pixels, a step is the same computation for any world size at the same global batch
(:class:`SegmenterStep` is what the equivalence test drives); without it (the default: cheaper) each rank
normalises by its own batch and the loop averages the running statistics before each validation and
checkpoint. Every random draw of a step (augmentations, dropout) is seeded from (seed, step, rank), and the
batch stream is fast-forwarded on resume, so a resumed run continues exactly where its checkpoint left it.

Validation after each epoch counts every val mosaic once across ranks (:mod:`pipeline.evaluation`); the
model with the best val mIoU is kept as ``out_dir/model.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import Config, SegmenterConfig
from pipeline.data.augment import augment_batch, color_augment
from pipeline.data.shards import MANIFEST, load_manifest
from pipeline.distributed import DistEnv, distributed, plain_module
from pipeline.engine import GracefulStop, Session
from pipeline.errors import UserError
from pipeline.evaluation.segmenter import val_segmenter_scores
from pipeline.models.segmenters import build_segmenter, save_segmenter, segmenter_from_config
from pipeline.training import loop

STAGE = "train_segmenter"
SECTIONS = ("data", "train", "segmenter")
MODEL_FILE = "model.pt"
POLY_POWER = 0.9  # DeepLab's poly schedule
DICE_SMOOTH = 1.0  # keeps the Dice term finite for a class absent from an image and its prediction
_INIT_STREAM, _AUGMENT_STREAM, _DROPOUT_STREAM = 0, 1, 2  # purposes of derived seeds


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of ``segmenter.lr`` at ``step``: linear warm-up, then poly (power 0.9) or cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "poly":
        return (1.0 - t) ** POLY_POWER
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}")


def segmentation_loss(
    logits: Tensor, masks: Tensor, ce_weight: float, dice_weight: float, class_weights: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """``ce_weight`` x cross-entropy + ``dice_weight`` x (1 - soft Dice); both means over images.

    Class weights scale each pixel's cross-entropy and the loss is divided by the pixel count (not by the
    summed weights), and Dice is computed per image: both are then plain means over images, so the mean
    of per-rank losses is the global-batch loss for any split of the batch across ranks.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, masks, weight=class_weights, reduction="none").mean()
    probs = logits.softmax(1)
    target = F.one_hot(masks, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    overlap = (probs * target).sum((2, 3))
    total = probs.sum((2, 3)) + target.sum((2, 3))
    dice = 1.0 - ((2.0 * overlap + DICE_SMOOTH) / (total + DICE_SMOOTH)).mean()
    loss = ce_weight * ce + dice_weight * dice
    return loss, {"loss": loss.detach(), "ce": ce.detach(), "dice": dice.detach()}


def build_model(
    s: SegmenterConfig, num_classes: int, env: DistEnv, seed: int, channels_last: bool, compiled: bool = False
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The U-Net (identical initial weights on every rank and world size; DDP when distributed) and AdamW.

    Weight decay applies to conv weights only, not to BatchNorm scales or biases.
    """
    model = loop.seeded(
        loop.derive_seed(seed, _INIT_STREAM),
        lambda: segmenter_from_config(s, num_classes),
    )
    model = loop.place(model, env, sync_bn=s.sync_bn, channels_last=channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=s.lr
    )
    return loop.wrap_ddp(model, env, compiled), optimizer


class SegmenterStep:
    """One optimisation step on this rank's slice of the global batch; returns this rank's loss terms."""

    def __init__(
        self,
        s: SegmenterConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        env: DistEnv,
        total_steps: int,
        channels_last: bool,
        class_weights: Tensor | None = None,
    ) -> None:
        self.s, self.model, self.optimizer, self.env, self.total_steps = s, model, optimizer, env, total_steps
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.class_weights = class_weights.to(env.device) if class_weights is not None else None
        self.scaler = env.grad_scaler()

    def lr(self, step: int) -> float:
        return self.s.lr * lr_factor(step, self.total_steps, self.s.warmup_steps, self.s.schedule)

    def __call__(self, step: int, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        s, env = self.s, self.env
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step)
        self.model.train()
        images = images.to(env.device, non_blocking=True).contiguous(memory_format=self.fmt)
        masks = masks.to(env.device, non_blocking=True)
        with env.autocast():
            logits = self.model(images)
        loss, terms = segmentation_loss(logits, masks, s.ce_weight, s.dice_weight, self.class_weights)
        self.optimizer.zero_grad(set_to_none=True)
        norm, skipped = loop.backward_and_step(loss, self.optimizer, self.scaler, self.model.parameters())
        values = {f"train_{k}": v for k, v in terms.items()} | {"train_grad_norm": norm}
        return values if skipped is None else values | {"fp16_skipped": skipped}


def check_params(s: SegmenterConfig, num_classes: int, world_size: int) -> None:
    """Params that cannot work with these shards or this world size, as one-line user errors."""
    if s.batch_size % world_size:
        raise UserError(
            f"segmenter.batch_size: {s.batch_size} does not divide by the world size {world_size} "
            "(the global batch is split evenly across ranks)"
        )
    if s.class_weights and len(s.class_weights) != num_classes:
        raise UserError(
            f"segmenter.class_weights: {len(s.class_weights)} weights for the {num_classes} classes of the shards"
        )


class SegmenterTask(loop.Task):
    """The segmenter trained on augmented mosaics by :class:`SegmenterStep`, validated once per epoch."""

    stage, sections, data_kind = STAGE, SECTIONS, "mosaics"
    best_metric, maximize = "val_miou", True
    postfix = ("train_loss", "lr", "best_val_miou")

    def __init__(self, cfg: Config, shard_dir: Path, out_dir: Path, env: DistEnv) -> None:
        s = cfg.segmenter
        self.cfg, self.env, self.shard_dir, self.out_dir = cfg, env, shard_dir, out_dir
        self.classes = list(load_manifest(shard_dir)["classes"])
        check_params(s, len(self.classes), env.world_size)
        self.sync_bn = s.sync_bn
        total = s.epochs * s.steps_per_epoch
        self.schedule = loop.Schedule(
            total=total,
            batch_size=s.batch_size,
            log_every=s.log_every,
            validate_every=s.steps_per_epoch,
            checkpoint_every=s.checkpoint_every,
        )
        self.model, self.optimizer = build_model(
            s, len(self.classes), env, cfg.seed, cfg.train.channels_last, cfg.train.compile
        )
        weights = torch.tensor(s.class_weights, dtype=torch.float32) if s.class_weights else None
        self.step_fn = SegmenterStep(s, self.model, self.optimizer, env, total, cfg.train.channels_last, weights)
        self.scales = (1.0 - s.scale_augment, 1.0 + s.scale_augment) if s.scale_augment > 0 else None
        self.last: dict[str, Any] = {}

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in plain_module(self.model).parameters())

    def batches(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        s = self.cfg.segmenter
        return loop.rank_batches(self.cfg, self.env, self.shard_dir, "mosaics", s.batch_size, s.steps_per_epoch, start)

    def step(self, step: int, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        cfg, s, geometry = self.cfg, self.cfg.segmenter, self.cfg.data.augment
        gen = torch.Generator().manual_seed(loop.derive_seed(cfg.seed, _AUGMENT_STREAM, step, self.env.rank))
        images, masks = augment_batch(
            *batch, len(self.classes), gen, flip=geometry.flip, rot90=geometry.rot90, scale_range=self.scales
        )
        images = color_augment(images, gen, s.color_augment)
        torch.manual_seed(loop.derive_seed(cfg.seed, _DROPOUT_STREAM, step, self.env.rank))
        return self.step_fn(step, images, masks)

    def log_values(self, step: int) -> dict[str, float]:
        return {"lr": self.step_fn.lr(step)}

    def validate(self, step: int) -> dict[str, float]:
        s = self.cfg.segmenter
        scores = val_segmenter_scores(
            self.model, self.shard_dir, s.batch_size // self.env.world_size, self.env, self.classes,
            self.cfg.train.channels_last,
        )  # fmt: skip
        self.last = scores["result"] | {"epoch": step // s.steps_per_epoch}
        return scores["metrics"] | {"epoch": self.last["epoch"]}

    def best_meta(self) -> dict[str, Any]:
        r = self.last
        return {"epoch": r["epoch"], "val_pixel_accuracy": r["pixel_accuracy"], "val_iou": r["iou"]}

    def modules(self) -> list[nn.Module]:
        return [plain_module(self.model)]

    def weights(self) -> dict[str, Tensor]:
        return plain_module(self.model).state_dict()

    def state(self) -> dict[str, Any]:
        return {
            "model": plain_module(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.step_fn.scaler.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        plain_module(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.step_fn.scaler.load_state_dict(state["scaler"])

    def export(self, weights: dict[str, Tensor], meta: dict[str, Any]) -> None:
        net = plain_module(self.model)
        model = build_segmenter(net.arch, **net.kwargs)  # plain BatchNorm, whatever the training used
        model.load_state_dict(weights)
        save_segmenter(self.out_dir / MODEL_FILE, model, {"classes": self.classes} | meta)


def train_segmenter(cfg: Config, shard_dir: Path, out_dir: Path, ckpt_dir: Path) -> None:
    """Train with the params of ``cfg.segmenter`` under the current torchrun job (or alone).

    Writes (rank 0) ``out_dir/model.pt`` (best val mIoU), ``out_dir/run.json``, ``out_dir/history.csv``
    and the resumable ``ckpt_dir/last.pt``.
    """
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    with distributed(cfg.train) as env, GracefulStop() as stop:
        task = SegmenterTask(cfg, shard_dir, out_dir, env)
        fingerprint = loop.CHECKPOINT_FORMAT
        session = Session(cfg, STAGE, SECTIONS, env, Path(ckpt_dir), out_dir, shard_dir / MANIFEST, fingerprint)
        tags = {"model.arch": cfg.segmenter.arch, "model.num_params": str(task.num_params)}
        tags["model.classes"] = ",".join(task.classes)
        loop.run(task, session, env, stop, tags=tags)
