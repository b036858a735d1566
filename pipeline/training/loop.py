"""One training loop for every trained model: placement, resume, schedule, settle, keep-best, stop, failure.

A model family supplies a small :class:`Task` (build models and optimisers, ``step``, ``validate``,
``state``/``load_state``, ``export``); :func:`run` owns everything they share:

- placement: initial weights from the run seed (:func:`seeded`), SyncBN or per-rank BatchNorm, memory
  format (:func:`place`) and the one DDP wrapper (:func:`wrap_ddp`);
- resume: the last checkpoint of these params and data (a finished run's checkpoint starts afresh);
- the step schedule: log windows averaged over ranks (with ``samples_per_s`` and ``data_wait``, the
  share of the window's wall time spent waiting for the next batch), validation, sample grids and
  checkpoints, each at its own interval (:class:`Schedule`);
- per-rank BatchNorm statistics averaged across ranks before every validation, sample and checkpoint;
- the best weights by the task's validation metric, exported by rank 0 at each new best;
- the NaN guard, SIGTERM/SIGINT -> checkpoint and exit 143, MLflow run status on failure, final outputs.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.config import Config
from pipeline.data.loaders import Kind, train_stream
from pipeline.distributed import DistEnv, all_reduce_mean, average_buffers, convert_sync_batchnorm
from pipeline.engine import EXIT_STOPPED, GracefulStop, History, Session, check_finite

T = TypeVar("T")
CHECKPOINT_FORMAT = "loop-1"  # part of the params hash: checkpoints of another layout are not resumed
# torch 2.13 renamed DDP's ``broadcast_buffers`` (and warns on the old name); older releases only know it.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)


def derive_seed(seed: int, *words: int) -> int:
    """A 63-bit seed for one purpose (and step, rank) derived from the run's seed."""
    return int(np.random.SeedSequence([seed, *words]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seeded(seed: int, build: Callable[[], T]) -> T:
    """``build()`` with torch's RNG seeded by ``seed`` in a forked RNG: initial weights are the same on every
    rank and for every world size, and the process RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def place(module: nn.Module, env: DistEnv, *, sync_bn: bool, channels_last: bool) -> nn.Module:
    """SyncBN when asked for and distributed, then moved to the device in the chosen memory format."""
    if env.distributed and sync_bn:
        module = convert_sync_batchnorm(module, env.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return module.to(env.device, memory_format=fmt)


def wrap_ddp(module: nn.Module, env: DistEnv, compiled: bool = False) -> nn.Module:
    """DDP when distributed (the module itself otherwise), without a buffer broadcast at each forward, then
    ``torch.compile`` when asked for (DDP first: its bucketing splits the compiled graphs).

    Running statistics are only read in eval mode, after :func:`run` settled them (or SyncBN kept them
    identical); spectral-norm vectors follow identical weights.
    """
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        module = DDP(module, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC)
    return torch.compile(module) if compiled else module


def rank_batches(
    cfg: Config, env: DistEnv, shard_dir: Path, kind: Kind, global_batch: int, per_epoch: int, start: int
) -> Iterator[Any]:
    """This rank's endless train batches (``global_batch / world_size`` samples each), from batch ``start`` on."""
    return train_stream(
        shard_dir,
        kind,
        global_batch // env.world_size,
        per_epoch,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=cfg.train.num_workers,
        seed=cfg.seed,
        start=start,
        pin_memory=env.device.type == "cuda",  # page-locked batches: the non-blocking copies overlap compute
    )


def backward_and_step(
    loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, parameters: Iterator[Tensor]
) -> tuple[Tensor, Tensor | None]:
    """Backward, the gradient norm, the optimiser step, through ``scaler`` (fp16: one scaler per optimiser,
    updated after each of its steps, so several updates of one optimiser per training step stay correct).

    Returns (the unscaled gradient norm, whether fp16 skipped this step (None without fp16)). A step
    skipped for inf/NaN gradients is part of fp16 training: its norm is reported as 0, the skip counted.
    """
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None]).detach()
    scaler.step(optimizer)
    if not scaler.is_enabled():
        return norm, None
    scaler.update()
    finite = torch.isfinite(norm)
    return torch.where(finite, norm, torch.zeros_like(norm)), (~finite).float()


@dataclass(frozen=True)
class Schedule:
    """When the loop logs, validates, samples and checkpoints (every ``n`` steps; 0 = only where forced).

    Validation and checkpoints also happen at the last step; a validation is always followed by a checkpoint.
    """

    total: int
    batch_size: int  # global samples per step, for samples_per_s
    log_every: int
    validate_every: int = 0
    checkpoint_every: int = 0
    sample_every: int = 0
    validate_at_start: bool = False

    @staticmethod
    def due(step: int, every: int) -> bool:
        return every > 0 and step % every == 0


class Task:
    """What a model family supplies to :func:`run`. Every rank holds one; rank 0 alone writes files.

    ``best_metric`` names the key of :meth:`validate`'s result whose best value keeps the weights
    (``None``: the last weights are the result).
    """

    stage: str
    sections: tuple[str, ...]
    data_kind: Kind  # the shards it trains on: logged as the run's dataset input
    schedule: Schedule
    best_metric: str | None = None
    maximize: bool = False
    sync_bn: bool = False
    postfix: tuple[str, ...] = ()  # row keys shown in the progress bar

    def batches(self, start: int) -> Iterator[Any]:
        """One item per step, beginning with step ``start``."""
        raise NotImplementedError

    def step(self, step: int, batch: Any) -> dict[str, Tensor | float]:
        """One optimisation step (0-based) on this rank's batch; this rank's scalars (averaged by the loop)."""
        raise NotImplementedError

    def validate(self, step: int) -> dict[str, float]:
        """Validation metrics, the same on every rank; every rank calls it."""
        return {}

    def best_meta(self) -> dict[str, Any]:
        """What the model file records about the validation just run, when it gave the best weights."""
        return {}

    def log_values(self, step: int) -> dict[str, float]:
        """Extra values for a log row (e.g. the learning rate)."""
        return {}

    def modules(self) -> list[nn.Module]:
        """The modules whose per-rank BatchNorm statistics are averaged before validating and saving."""
        return []

    def weights(self) -> dict[str, Tensor]:
        """The weights :meth:`export` writes (those of the model being validated)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def sample(self, step: int) -> np.ndarray | None:
        """Rank 0: an image (uint8 H x W x 3) logged to MLflow at ``schedule.sample_every``."""
        return None

    def export(self, weights: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Rank 0: write the model file from ``weights``."""
        raise NotImplementedError

    def finish(self, weights: dict[str, Tensor], meta: dict[str, Any]) -> list[Path]:
        """Rank 0, at the end: the final model file and extra outputs; returns files to log as artifacts."""
        self.export(weights, meta)
        return []


class _Window:
    """Per-step values averaged over a logging window, with its throughput and data wait."""

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0) -> None:
        self.sums, self.count = dict(sums or {}), count  # checkpointed: a resumed window averages every step
        self.samples, self.waited = 0, 0.0
        self.started = time.perf_counter()

    def add(self, values: dict[str, float], samples: int, waited: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count, self.samples, self.waited = self.count + 1, self.samples + samples, self.waited + waited

    def flush(self) -> dict[str, float]:
        now = time.perf_counter()
        wall = max(now - self.started, 1e-9)
        out = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        out |= {"samples_per_s": self.samples / wall, "data_wait": min(1.0, self.waited / wall)}
        self.__init__()
        return out


def _copy(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in weights.items()}


class _Run:
    """One execution of a task on this rank: resume state, the loop, the best weights, the outputs."""

    def __init__(self, task: Task, session: Session, env: DistEnv) -> None:
        self.task, self.session, self.env = task, session, env
        self.step = 0
        self.history = History()
        self.best: dict[str, Any] | None = None
        self.best_weights: dict[str, Tensor] | None = None
        self.window = _Window()
        ckpt = session.resume()
        if ckpt is not None and ckpt["step"] >= task.schedule.total:
            # A finished run's checkpoint: the stage is being rerun (DVC reruns only when something changed).
            session.print(f"{task.stage}: {session.last_path} is from a finished run; training from scratch")
            ckpt, session.run_id = None, None
        if ckpt is not None:
            task.load_state(ckpt)
            self.step, self.history = int(ckpt["step"]), History(ckpt["history"])
            self.best, self.best_weights = ckpt["best"], ckpt["best_weights"]
            self.window = _Window(**ckpt["window"])

    def settle(self) -> None:
        """One model on every rank: per-rank BatchNorm running statistics averaged; all ranks call it."""
        if self.env.distributed and not self.task.sync_bn:
            for module in self.task.modules():
                average_buffers(module)

    def save(self) -> None:
        window = {"sums": self.window.sums, "count": self.window.count}
        extra = {"history": self.history.rows, "best": self.best, "best_weights": self.best_weights, "window": window}
        self.session.save(self.task.state() | extra, self.step)

    def validate(self) -> dict[str, float]:
        """The task's validation; a new best keeps its weights (rank 0 exports them)."""
        task, row = self.task, self.task.validate(self.step)
        if task.best_metric is None:
            return row
        value = row[task.best_metric]
        better = self.best is None or (
            value > self.best[task.best_metric] if task.maximize else value < self.best[task.best_metric]
        )
        if better:
            self.best = {"step": self.step, task.best_metric: value, **task.best_meta()}
            self.best_weights = _copy(task.weights())
            if self.env.is_main:
                task.export(self.best_weights, self.best | {"run_id": self.session.run_id})
        return row | {f"best_{task.best_metric}": self.best[task.best_metric], "best_step": self.best["step"]}

    def record(self, row: dict[str, float]) -> None:
        self.history.append(self.step, row)
        self.session.logger.log_metrics(row, self.step)

    def train(self, stop: GracefulStop, progress: bool) -> None:
        task, session, schedule, env = self.task, self.session, self.task.schedule, self.env
        if self.step == 0 and schedule.validate_at_start:
            self.record(self.validate())  # the untrained model: the baseline later values are read against
            self.save()
        batches = task.batches(self.step)
        window = self.window
        with session.progress(schedule.total, self.step, task.stage, enabled=progress) as bar:
            while self.step < schedule.total:
                waiting = time.perf_counter()
                batch = next(batches)
                waited = time.perf_counter() - waiting
                values = all_reduce_mean(task.step(self.step, batch), env.device)
                self.step += 1
                step = self.step
                check_finite(values, step, session.last_path)
                window.add(values, schedule.batch_size, waited)
                bar.update(1)
                row: dict[str, float] = {}
                if Schedule.due(step, schedule.log_every) or step == schedule.total:
                    row |= window.flush() | task.log_values(step - 1)
                validating = Schedule.due(step, schedule.validate_every) or step == schedule.total
                sampling = Schedule.due(step, schedule.sample_every)
                saving = validating or Schedule.due(step, schedule.checkpoint_every) or step == schedule.total
                if validating or sampling or saving:
                    self.settle()
                if validating:
                    row |= self.validate()
                if row:
                    self.record(row)
                    bar.set_postfix({k: f"{row[k]:.3g}" for k in (*task.postfix, "data_wait") if k in row})
                if sampling and env.is_main and (image := task.sample(step)) is not None:
                    session.logger.log_image(image, f"samples/step_{step:06d}.png")
                if saving:
                    self.save()
                if step < schedule.total and stop.should_stop(env.device):
                    if not saving:
                        self.settle()
                        self.save()
                    session.print(
                        f"{task.stage}: stopped at step {step}/{schedule.total}; resumable from {session.last_path}"
                    )
                    session.logger.end("KILLED")
                    raise SystemExit(EXIT_STOPPED)

    def finish(self) -> None:
        """Rank 0: the kept (or last) weights through the task, the history and the run record."""
        task, session = self.task, self.session
        if self.best_weights is None:
            self.best, self.best_weights = {"step": self.step}, _copy(task.weights())
        if self.env.is_main:
            artifacts = task.finish(self.best_weights, self.best | {"run_id": session.run_id})
            history = session.out_dir / "history.csv"
            self.history.write_csv(history)
            session.write_run_json()
            for path in [*artifacts, history]:
                session.logger.log_artifact(path)
        if task.best_metric is not None:
            best = {k: v for k, v in self.best.items() if k in ("step", task.best_metric)}
            session.print(f"{task.stage}: best {task.best_metric} {best[task.best_metric]:.4g} at step {best['step']}")
        session.logger.end("FINISHED")


def run(
    task: Task,
    session: Session,
    env: DistEnv,
    stop: GracefulStop,
    tags: dict[str, str] | None = None,
    progress: bool = True,
) -> None:
    """Train ``task`` to ``task.schedule.total`` steps (resuming when a checkpoint of these params exists).

    Rank 0 writes the task's model file(s), ``history.csv`` and ``run.json`` into ``session.out_dir`` and
    ``last.pt`` into ``session.ckpt_dir``. SIGTERM/SIGINT: checkpoint, then ``SystemExit(143)``. A
    non-finite loss: :class:`pipeline.engine.NonFiniteLossError`, the last good checkpoint kept. Any other
    failure marks the MLflow run FAILED.
    """
    state = _Run(task, session, env)
    session.start_run(tags=tags, kind=task.data_kind)
    try:
        state.train(stop, progress)
        state.finish()
    except SystemExit:
        raise
    except BaseException:
        session.logger.end("FAILED")
        raise
