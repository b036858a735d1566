"""MLflow tracking: one run per training stage, rank 0 only, resumable across restarts, with lineage tags."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, flatten
from pipeline.errors import UserError

TAG_GIT_COMMIT = "git.commit"
TAG_GIT_DIRTY = "git.dirty"
TAG_MANIFEST = "data.manifest_sha256"
TAG_PARAMS_HASH = "params.hash"
TAG_STAGE = "dvc.stage"


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``mlflow.tracking_uri`` from params."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri


def local_artifact_root(uri: str) -> str | None:
    """``mlartifacts/`` beside a local sqlite store (MLflow's server default), as a file URI; None for servers."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def configure(cfg: Config) -> None:
    """Point MLflow at the configured store and experiment; an unreachable server is one clear error."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    name = cfg.mlflow.experiment
    try:
        if mlflow.get_experiment_by_name(name) is None and (root := local_artifact_root(uri)):
            # Another process may create it at the same moment.
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                mlflow.create_experiment(name, artifact_location=root)
        mlflow.set_experiment(name)
    except Exception as exc:  # MlflowException, requests' ConnectionError, ...
        raise UserError(f"MLflow tracking server {uri}: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def git_info(cwd: str | Path = ".") -> dict[str, str]:
    """Commit and dirty flag of the working tree ("unknown" outside a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {TAG_GIT_COMMIT: "unknown", TAG_GIT_DIRTY: "unknown"}
    return {TAG_GIT_COMMIT: commit, TAG_GIT_DIRTY: str(bool(status.strip())).lower()}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunLogger:
    """An MLflow run driven by rank 0; every method is a no-op on other ranks (``enabled=False``).

    ``run_id`` resumes an existing run (a torchrun restart resuming from its checkpoint): params
    are then not logged again, since MLflow params are immutable, and metrics at steps the run
    already has (logged after the checkpoint, before the crash) are not logged twice.
    """

    def __init__(self, cfg: Config, stage: str, enabled: bool, run_id: str | None = None) -> None:
        self.cfg, self.stage, self.enabled = cfg, stage, enabled
        self.run_id: str | None = run_id
        self._logged_until = -1

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        if not self.enabled:
            return None
        import mlflow

        configure(self.cfg)
        client = mlflow.MlflowClient()
        if self.run_id is None:
            exp = mlflow.get_experiment_by_name(self.cfg.mlflow.experiment)
            run = client.create_run(exp.experiment_id, run_name=self.stage)
            self.run_id = run.info.run_id
            client.log_batch(
                self.run_id, params=[mlflow.entities.Param(k, _param_str(v)) for k, v in sorted(params.items())]
            )
        else:
            client.update_run(self.run_id, status="RUNNING")
            history = (client.get_metric_history(self.run_id, k) for k in client.get_run(self.run_id).data.metrics)
            self._logged_until = max((m.step for h in history for m in h), default=-1)
        base = {
            TAG_STAGE: self.stage,
            "python": platform.python_version(),
            **git_info(),
        }
        client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in (base | tags).items()])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics or step <= self._logged_until:
            return
        import mlflow

        ts = mlflow.utils.time.get_current_time_millis()
        entries = [mlflow.entities.Metric(k, float(v), ts, step) for k, v in sorted(metrics.items())]
        mlflow.MlflowClient().log_batch(self.run_id, metrics=entries)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.MlflowClient().log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.MlflowClient().log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.MlflowClient().log_dict(self.run_id, obj, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.MlflowClient().set_terminated(self.run_id, status=status)


def _param_str(value: Any) -> str:
    text = str(list(value) if isinstance(value, tuple) else value)
    return text[:6000]


def stage_params(cfg: Config, *sections: str) -> dict[str, Any]:
    """Flattened ``section.key`` params plus the seed, for an MLflow run."""
    out: dict[str, Any] = {"seed": cfg.seed}
    for s in sections:
        out |= flatten(getattr(cfg, s), f"{s}.")
    return out


def log_run_metrics(cfg: Config, run_id: str, metrics: dict[str, float], artifacts: list[Path] | None = None) -> None:
    """Add final (evaluation) metrics and files to an existing run, e.g. from the evaluate stage."""
    import mlflow

    configure(cfg)
    client = mlflow.MlflowClient()
    ts = mlflow.utils.time.get_current_time_millis()
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), ts, 0) for k, v in sorted(metrics.items())])
    for path in artifacts or []:
        client.log_artifact(run_id, str(path), "evaluation")


def read_run_json(model_dir: Path) -> dict[str, Any]:
    """A model directory's ``run.json`` (its training run id, experiment and tracking URI)."""
    path = Path(model_dir) / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read training run record ({exc})") from None
