"""Train the U-Net texture segmenter under torchrun: DDP, validation each epoch, resumable.

Distribution: each rank trains on ``segmenter.batch_size / world_size`` mosaics per step from its own
shards (:func:`pipeline.data.loaders.train_batches`). With ``segmenter.sync_bn`` BatchNorm statistics span
the global batch and, the loss being a mean over images and pixels, a step is the same computation for any
world size at the same global batch (``SegmenterStep`` is what the equivalence test drives); without it
(the default: cheaper) each rank normalises by its own batch and the running statistics are averaged
across ranks before each validation and checkpoint. Every random draw of a step
(augmentations, dropout) is seeded from (seed, step, rank), and the epoch's batch stream is re-created and
fast-forwarded on resume, so a resumed run continues exactly where its checkpoint left it.

Validation after each epoch counts every val mosaic once across ranks into one confusion matrix; the
model with the best val mIoU is kept as ``out_dir/model.pt``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.config import Config, SegmenterConfig
from pipeline.data.augment import augment_batch, color_augment
from pipeline.data.loaders import eval_batches, train_stream
from pipeline.data.shards import MANIFEST, load_manifest
from pipeline.distributed import (
    DistEnv,
    all_reduce_mean,
    average_buffers,
    convert_sync_batchnorm,
    distributed,
    plain_module,
)
from pipeline.engine import EXIT_STOPPED, GracefulStop, History, Session, Throughput, check_finite
from pipeline.errors import UserError
from pipeline.metrics.segmentation import ConfusionMatrix
from pipeline.models.unet import UNet, save_segmenter

STAGE = "train_segmenter"
SECTIONS = ("data", "train", "segmenter")
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.csv"
POLY_POWER = 0.9  # DeepLab's poly schedule
DICE_SMOOTH = 1.0  # keeps the Dice term finite for a class absent from an image and its prediction
_INIT_STREAM, _AUGMENT_STREAM, _DROPOUT_STREAM = 0, 1, 2  # purposes of derived seeds
STEP_METRICS = ("loss", "ce", "dice")
# torch 2.13 renamed DDP's ``broadcast_buffers`` (and warns on the old name); older releases only know it.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)


def derive_seed(seed: int, *words: int) -> int:
    """A 63-bit seed for one purpose (and step, rank) derived from the run's seed."""
    return int(np.random.SeedSequence([seed, *words]).generate_state(2, np.uint64)[0] >> np.uint64(1))


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
    s: SegmenterConfig, num_classes: int, env: DistEnv, seed: int, channels_last: bool
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The U-Net (identical initial weights on every rank and world size; DDP when distributed) and AdamW.

    Weight decay applies to conv weights only, not to BatchNorm scales or biases.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _INIT_STREAM))
        model: nn.Module = UNet(
            num_classes, s.channels, s.depth, s.upsample, s.dropout, s.dilated_bottleneck, s.decoder, s.tta
        )
    if env.distributed and s.sync_bn:
        model = convert_sync_batchnorm(model, env.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(env.device, memory_format=fmt)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=s.lr
    )
    if env.distributed:
        # No buffer broadcast at each forward (a collective per step): SyncBN's running statistics are
        # identical on every rank, per-rank BN's are averaged before each validation and checkpoint.
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = DDP(model, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC)
    return model, optimizer


class SegmenterStep:
    """One optimisation step on this rank's slice of the global batch; returns the loss terms averaged over ranks."""

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

    def lr(self, step: int) -> float:
        return self.s.lr * lr_factor(step, self.total_steps, self.s.warmup_steps, self.s.schedule)

    def __call__(self, step: int, images: Tensor, masks: Tensor) -> dict[str, float]:
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
        loss.backward()
        self.optimizer.step()
        # The same averaged values on every rank: a NaN stops all ranks at the same step.
        return all_reduce_mean({k: float(v) for k, v in terms.items()}, env.device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    shard_dir: Path,
    split: str,
    batch_size: int,
    num_classes: int,
    env: DistEnv | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Confusion-matrix metrics (``iou``, ``miou``, ``pixel_accuracy``, ...) over every mosaic of ``split``.

    With ``env``, each rank predicts its share (sample i on rank i % world_size) and the matrices are
    summed over ranks, so every mosaic counts exactly once. ``env=None``: this process alone predicts every
    mosaic (no collective, even inside a process group) on the model's device, in fp32. Scores one view
    (``UNet.logits``): the test-time views would cost ~6x for a ranking of epochs that one view gives too;
    the evaluate stage scores the model as it serves.
    """
    net = plain_module(model)  # no DDP wrapper: ranks may get different numbers of batches
    was_training = net.training
    net.eval()
    device = env.device if env is not None else next(net.parameters()).device
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    matrix = ConfusionMatrix(num_classes)
    try:
        for images, masks in eval_batches(shard_dir, "mosaics", split, batch_size, rank=rank, world_size=world):
            images = images.to(device).contiguous(memory_format=fmt)
            with env.autocast() if env is not None else contextlib.nullcontext():
                logits = net.logits(images)
            matrix.update(logits.argmax(1), masks)
    finally:
        net.train(was_training)
    if env is not None:
        matrix.reduce_from_all_processes()
    return matrix.compute()


def _val_metrics(result: dict[str, Any], classes: list[str]) -> dict[str, float]:
    metrics = {"val_miou": result["miou"], "val_pixel_accuracy": result["pixel_accuracy"]}
    metrics |= {f"val_iou_{name}": iou for name, iou in zip(classes, result["iou"], strict=True)}
    return metrics


def _check_params(s: SegmenterConfig, num_classes: int, world_size: int) -> None:
    if s.batch_size % world_size:
        raise UserError(
            f"segmenter.batch_size: {s.batch_size} does not divide by the world size {world_size} "
            "(the global batch is split evenly across ranks)"
        )
    if s.class_weights and len(s.class_weights) != num_classes:
        raise UserError(
            f"segmenter.class_weights: {len(s.class_weights)} weights for the {num_classes} classes of the shards"
        )


def train_segmenter(cfg: Config, shard_dir: Path, out_dir: Path, ckpt_dir: Path) -> None:
    """Train with the params of ``cfg.segmenter`` under the current torchrun job (or alone).

    Writes (rank 0) ``out_dir/model.pt`` (best val mIoU), ``out_dir/run.json``, ``out_dir/history.csv``
    and the resumable ``ckpt_dir/last.pt``. SIGTERM/SIGINT: checkpoint, then ``SystemExit(143)``.
    """
    shard_dir, out_dir, ckpt_dir = Path(shard_dir), Path(out_dir), Path(ckpt_dir)
    s = cfg.segmenter
    classes = list(load_manifest(shard_dir)["classes"])
    num_classes = len(classes)
    with distributed(cfg.train) as env, GracefulStop() as stop:
        _check_params(s, num_classes, env.world_size)
        local_batch = s.batch_size // env.world_size
        channels_last = cfg.train.channels_last
        session = Session(cfg, STAGE, SECTIONS, env, ckpt_dir, out_dir, shard_dir / MANIFEST)
        model, optimizer = build_model(s, num_classes, env, cfg.seed, channels_last)
        total = s.epochs * s.steps_per_epoch
        weights = torch.tensor(s.class_weights, dtype=torch.float32) if s.class_weights else None
        train_step = SegmenterStep(s, model, optimizer, env, total, channels_last, weights)

        step, history, best, best_state = 0, History(), {"val_miou": -math.inf, "epoch": 0}, None
        ckpt = session.resume()
        if ckpt is not None and ckpt["step"] >= total:
            # A finished run's checkpoint: the stage is being rerun (DVC reruns only when something changed).
            session.print(f"{STAGE}: {session.last_path} is from a finished run; training from scratch")
            ckpt, session.run_id = None, None
        if ckpt is not None:
            plain_module(model).load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step, history, best, best_state = ckpt["step"], History(ckpt["history"]), ckpt["best"], ckpt["best_model"]
        n_params = sum(p.numel() for p in plain_module(model).parameters())
        session.start_run(tags={"model.num_params": str(n_params), "model.classes": ",".join(classes)})

        def state() -> dict[str, Any]:
            return {
                "model": plain_module(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history.rows,
                "best": best,
                "best_model": best_state,
            }

        def settle() -> None:
            """One model on every rank (per-rank BatchNorm statistics averaged) before validating or saving."""
            if env.distributed and not s.sync_bn:
                average_buffers(plain_module(model))

        geometry = cfg.data.augment
        scales = (1.0 - s.scale_augment, 1.0 + s.scale_augment) if s.scale_augment > 0 else None
        bar = session.progress(total, step, STAGE)
        speed, window = Throughput(), []
        try:
            batches = train_stream(
                shard_dir,
                "mosaics",
                local_batch,
                s.steps_per_epoch,
                rank=env.rank,
                world_size=env.world_size,
                num_workers=cfg.train.num_workers,
                seed=cfg.seed,
                start=step,
            )
            while step < total:
                images, masks = next(batches)
                gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _AUGMENT_STREAM, step, env.rank))
                images, masks = augment_batch(
                    images, masks, num_classes, gen, flip=geometry.flip, rot90=geometry.rot90, scale_range=scales
                )
                images = color_augment(images, gen, s.color_augment)
                torch.manual_seed(derive_seed(cfg.seed, _DROPOUT_STREAM, step, env.rank))
                terms = train_step(step, images, masks)
                check_finite(terms, step, session.last_path)
                window.append(terms)
                speed.add(s.batch_size)
                step += 1
                bar.update(1)
                if step % s.log_every == 0 or step == total:
                    logged = {f"train_{k}": sum(w[k] for w in window) / len(window) for k in STEP_METRICS}
                    logged |= {"lr": train_step.lr(step - 1), "samples_per_s": speed.rate()}
                    window.clear()
                    history.append(step, logged)
                    session.logger.log_metrics(logged, step)
                    bar.set_postfix(loss=f"{logged['train_loss']:.3f}", lr=f"{logged['lr']:.2e}")
                epoch, within = divmod(step, s.steps_per_epoch)
                epoch_end = within == 0
                saved = epoch_end or step % s.checkpoint_every == 0
                if saved:
                    settle()
                if epoch_end:
                    result = evaluate(model, shard_dir, "val", local_batch, num_classes, env, channels_last)
                    metrics = _val_metrics(result, classes) | {"epoch": epoch}
                    history.append(step, metrics)
                    session.logger.log_metrics(metrics, step)
                    session.print(f"{STAGE}: epoch {epoch}/{s.epochs}: val mIoU {result['miou']:.4f}")
                    if result["miou"] > best["val_miou"]:
                        best = {"val_miou": result["miou"], "epoch": epoch, "step": step}
                        best |= {"val_pixel_accuracy": result["pixel_accuracy"], "val_iou": result["iou"]}
                        best_state = {k: v.detach().cpu().clone() for k, v in plain_module(model).state_dict().items()}
                if saved:
                    session.save(state(), step)
                if step < total and stop.should_stop(env.device):
                    if not saved:
                        settle()
                        session.save(state(), step)
                    session.print(f"{STAGE}: stopped at step {step}/{total}; resumable from {session.last_path}")
                    session.logger.end("KILLED")
                    raise SystemExit(EXIT_STOPPED)
        except SystemExit:
            raise
        except BaseException:
            session.logger.end("FAILED")
            raise
        finally:
            bar.close()
        if env.is_main:
            best_model = UNet(**plain_module(model).kwargs)
            best_model.load_state_dict(best_state)
            save_segmenter(out_dir / MODEL_FILE, best_model, {"classes": classes, "run_id": session.run_id, **best})
            history.write_csv(out_dir / HISTORY_FILE)
        session.write_run_json()
        session.logger.log_metrics({"best_val_miou": best["val_miou"], "best_epoch": best["epoch"]}, total)
        session.logger.end("FINISHED")
        session.print(
            f"{STAGE}: best val mIoU {best['val_miou']:.4f} (epoch {best['epoch']}) -> {out_dir / MODEL_FILE}"
        )
