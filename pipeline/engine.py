"""What a stage's training session holds: resume + MLflow run continuity, the stage lock, graceful stop, the NaN
guard, history and progress. :mod:`pipeline.training.loop` drives them; nothing else trains.

No process RNG state is checkpointed: a task seeds each step's draws from (seed, purpose, step, rank), or keeps
its own generator in its state, so a resumed run draws what the straight run drew (the resume tests check it
weight for weight)."""

from __future__ import annotations

import csv
import hashlib
import io
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.distributed import DistEnv, any_rank, barrier, broadcast_object
from pipeline.errors import UserError
from pipeline.tracking import TAG_MANIFEST, TAG_PARAMS_HASH, RunLogger, file_sha256, stage_params, tracking_uri

EXIT_STOPPED = 143  # 128 + SIGTERM: "stopped on request, checkpoint saved"


class NonFiniteLossError(UserError):
    """A loss became NaN/inf: training stops, the last good checkpoint stays."""


def check_finite(values: dict[str, float], step: int, kept: Path) -> None:
    """Raise :class:`NonFiniteLossError` naming the first non-finite value."""
    for name, value in values.items():
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise NonFiniteLossError(
                f"step {step}: {name} is {value}; training stopped, last good checkpoint kept at {kept}"
            )


class GracefulStop:
    """SIGTERM/SIGINT set a flag instead of killing the process; the loop saves and exits at a step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> GracefulStop:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank once any rank got a signal (so all stop at the same step)."""
        return any_rank(self.requested, device)


class History:
    """Metric rows (step + values) kept in the checkpoint and written as CSV for ``dvc plots``."""

    def __init__(self, rows: list[dict[str, float]] | None = None) -> None:
        self.rows = list(rows or [])

    def append(self, step: int, values: dict[str, float]) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in values.items()}})

    def write_csv(self, path: Path) -> None:
        columns = ["step", *sorted({k for r in self.rows for k in r} - {"step"})]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        checkpoint.atomic_write_text(path, buffer.getvalue())


class Session:
    """One stage execution: params hash, last checkpoint, the MLflow run, and rank-0 outputs.

    Rank 0 holds the checkpoint directory's :class:`~pipeline.checkpoint.StageLock` from here until it exits:
    a second run of the stage on that directory stops on every rank with one line naming the holder.
    """

    def __init__(
        self,
        cfg: Config,
        stage: str,
        sections: tuple[str, ...],
        env: DistEnv,
        ckpt_dir: Path,
        out_dir: Path,
        manifest: Path,
        fingerprint: str = "",
    ) -> None:
        self.cfg, self.stage, self.sections, self.env = cfg, stage, sections, env
        self.ckpt_dir, self.out_dir, self.manifest = Path(ckpt_dir), Path(out_dir), Path(manifest)
        refusal = None
        if env.is_main:
            try:
                checkpoint.hold_stage_lock(self.ckpt_dir)
            except checkpoint.StageLockedError as exc:
                refusal = str(exc)
        refusal = broadcast_object(refusal)  # the other ranks stop too instead of waiting for rank 0
        if refusal is not None:
            raise checkpoint.StageLockedError(refusal)
        self.manifest_sha256 = file_sha256(self.manifest)
        # The data (and what else the task names, e.g. its feature extractor and checkpoint layout) is part of
        # what a checkpoint was trained on: new shards mean a new run.
        self.params_hash = cfg.section_hash(*sections)[:16] + "-" + self.manifest_sha256[:16]
        if fingerprint:
            self.params_hash += "-" + hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self.run_id: str | None = None
        self.logger = RunLogger(cfg, stage, enabled=env.is_main)

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / checkpoint.LAST

    def resume(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (every rank loads it), or None for a fresh start."""
        ckpt = checkpoint.resume_state(
            self.ckpt_dir, self.params_hash, self.cfg.train.on_params_change, map_location=self.env.device
        )
        if ckpt is not None:
            self.run_id = ckpt.get("run_id")
            self.print(f"{self.stage}: resuming from {self.last_path} at step {ckpt['step']}")
        return ckpt

    def start_run(self, tags: dict[str, str] | None = None, kind: str = "") -> None:
        """Create the MLflow run (or reopen the checkpoint's) on rank 0, with the train split of ``kind``
        (``patches`` or ``mosaics``) as its dataset input."""
        env = self.env
        base = {
            TAG_MANIFEST: self.manifest_sha256,
            TAG_PARAMS_HASH: self.params_hash,
            "world_size": str(env.world_size),
            "backend": env.backend,
            "device": str(env.device.type),
            "precision": str(env.amp_dtype).replace("torch.", "") if env.amp_dtype else "fp32",
            "torch": torch.__version__,
        }
        self.logger.run_id = self.run_id
        params = stage_params(self.cfg, *self.sections)
        self.run_id = self.logger.start(params, base | (tags or {}), shards=self.manifest.parent, kind=kind)

    def save(self, state: dict[str, Any], step: int) -> None:
        """Rank 0 writes ``last.pt`` atomically (with the step, run id and params hash); all ranks wait."""
        if self.env.is_main:
            payload = {
                **state,
                "step": step,
                "params_hash": self.params_hash,
                "run_id": self.run_id,
            }
            checkpoint.save(payload, self.last_path)
        barrier()

    def write_run_json(self) -> None:
        if self.env.is_main:
            record = {
                "run_id": self.run_id,
                "experiment": self.cfg.mlflow.experiment,
                "tracking_uri": tracking_uri(self.cfg),
            }
            checkpoint.atomic_write_json(self.out_dir / "run.json", record)

    def progress(self, total: int, initial: int, desc: str, enabled: bool = True) -> tqdm:
        """A tqdm bar on rank 0 only; the loop calls ``update`` and ``set_postfix``."""
        disable = not (enabled and self.env.is_main)
        return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)

    def print(self, message: str) -> None:
        if self.env.is_main:
            print(message, file=sys.stderr, flush=True)
