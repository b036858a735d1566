"""MLflow tracking: one run per training stage, rank 0 only, resumable across restarts, with lineage tags."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, flatten
from pipeline.errors import UserError, one_line

TAG_GIT_COMMIT = "git.commit"
TAG_GIT_DIRTY = "git.dirty"
TAG_MANIFEST = "data.manifest_sha256"
TAG_PARAMS_HASH = "params.hash"
TAG_STAGE = "dvc.stage"
# The experiment's kind for MLflow 3's UI: the model-training kind its bundle knows (beside finetuning,
# genai_development, ...). Earlier 3.x UIs choose their view by it (DESIGN.md 6); 3.18 by its "GenAI | Model training"
# switch, which the URL sets with ?workflowType=machine_learning (tests/test_serving.py opens it so).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SPLIT_CONTEXT = {"train": "training", "test": "evaluation"}  # a dataset input's mlflow.data.context
SYSTEM_METRICS_MODULES = {"psutil": "psutil", "pynvml": "nvidia-ml-py"}  # module -> distribution


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``mlflow.tracking_uri`` from params."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri


def local_artifact_root(uri: str) -> str | None:
    """``mlartifacts/`` beside a local sqlite store (MLflow's server default), as a file URI; None for servers."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def configure(cfg: Config) -> None:
    """Point MLflow at the configured store and experiment, a model-training experiment (tagged so when it
    exists without a kind); an unreachable server is one clear error."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    name = cfg.mlflow.experiment
    try:
        if mlflow.get_experiment_by_name(name) is None and (root := local_artifact_root(uri)):
            # Another process may create it at the same moment.
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                mlflow.create_experiment(name, artifact_location=root, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        experiment = mlflow.set_experiment(name)
        if TAG_EXPERIMENT_KIND not in experiment.tags:  # created by a server or an older version of this code
            mlflow.set_experiment_tag(TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    except Exception as exc:  # MlflowException, requests' ConnectionError, ...
        raise UserError(f"MLflow tracking server {uri}: {type(exc).__name__}: {one_line(exc)}") from None


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


def source_tags(stage: str, commit: str) -> dict[str, str]:
    """MLflow's standard source tags for a stage's run: the UI's Source column (``train_gan.py``), the
    commit (when known) and the user (when the system knows one)."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    tags = {MLFLOW_SOURCE_NAME: f"stages/{stage}.py", MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL)}
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit
    with contextlib.suppress(KeyError, OSError):  # no login name and no passwd entry (some containers)
        tags[MLFLOW_USER] = getpass.getuser()
    return tags


def shard_dataset(shards: Path, kind: str, split: str) -> Any:
    """The ``split`` shards of ``kind`` (patches | mosaics) as an MLflow dataset: digest from the manifest's
    sha256 (as in the params hash), source the shard directory, schema the decoded sample fields."""
    import mlflow.data.dataset_source_registry as sources
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    if kind not in ("patches", "mosaics"):
        raise ValueError(f"kind: expected 'patches' or 'mosaics', got {kind!r}")
    path = Path(shards) / "manifest.json"
    try:
        blob = path.read_bytes()
        side = int(json.loads(blob)["params"]["patch_size" if kind == "patches" else "mosaic_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: cannot describe the shards for MLflow ({one_line(exc)})") from None
    image = TensorSpec(np.dtype(np.uint8), (-1, side, side, 3), "image")
    fields = {
        "patches": [image, TensorSpec(np.dtype(np.int64), (-1,), "class")],
        "mosaics": [image, TensorSpec(np.dtype(np.uint8), (-1, side, side), "mask")],
    }[kind]
    # By type, not resolve_dataset_source: two of MLflow's resolvers match a local path (and it warns).
    source = sources.get_dataset_source_from_json(json.dumps({"uri": str(Path(shards).resolve())}), "local")
    digest = hashlib.sha256(blob).hexdigest()[:16]
    return MetaDataset(source, name=f"{kind}/{split}", digest=digest, schema=Schema(fields))


def log_dataset(client: Any, run_id: str, dataset: Any, context: str) -> None:
    """Add ``dataset`` as an input of the run unless the run has it already in that context (a resumed run)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    for logged in client.get_run(run_id).inputs.dataset_inputs:
        same = (logged.dataset.name, logged.dataset.digest) == (dataset.name, dataset.digest)
        if same and {t.key: t.value for t in logged.tags}.get(MLFLOW_DATASET_CONTEXT) == context:
            return
    entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
    client.log_inputs(run_id, datasets=[entry])


def _require_system_metrics_modules() -> None:
    missing = [dist for module, dist in SYSTEM_METRICS_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(
            f"mlflow.system_metrics is true but {' and '.join(missing)} not installed: "
            "pip install 'texture-pipeline[system-metrics]' (or set it to false)"
        )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunLogger:
    """An MLflow run driven by rank 0; every method is a no-op on other ranks (``enabled=False``).

    ``run_id`` resumes an existing run (a torchrun restart resuming from its checkpoint): params
    are then not logged again, since MLflow params are immutable, metrics at steps the run
    already has (logged after the checkpoint, before the crash) are not logged twice, nor is the dataset.
    With ``mlflow.system_metrics`` on, MLflow samples CPU, memory, disk, network (and NVIDIA GPUs) into
    ``system/*`` metrics from start to end.
    """

    def __init__(self, cfg: Config, stage: str, enabled: bool, run_id: str | None = None) -> None:
        self.cfg, self.stage, self.enabled = cfg, stage, enabled
        self.run_id: str | None = run_id
        self._logged_until = -1
        self._system_metrics: Any = None

    def start(
        self, params: dict[str, Any], tags: dict[str, str], *, shards: Path | None = None, kind: str = ""
    ) -> str | None:
        """Create (or reopen) the run: params, tags, and the train split of ``kind`` in ``shards`` as its dataset."""
        if not self.enabled:
            return None
        import mlflow

        if self.cfg.mlflow.system_metrics:
            _require_system_metrics_modules()
        configure(self.cfg)
        client = mlflow.MlflowClient()
        resumed = self.run_id is not None
        if not resumed:
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
        git = git_info()
        base = {TAG_STAGE: self.stage, "python": platform.python_version(), **git}
        base |= source_tags(self.stage, git[TAG_GIT_COMMIT])
        client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in (base | tags).items()])
        if shards is not None:
            log_dataset(client, self.run_id, shard_dataset(shards, kind, "train"), SPLIT_CONTEXT["train"])
        if self.cfg.mlflow.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_metrics = SystemMetricsMonitor(self.run_id, resume_logging=resumed)
            self._system_metrics.start()
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

            if self._system_metrics is not None:
                self._system_metrics.finish()  # flushes the last samples while the run is still RUNNING
                self._system_metrics = None
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


def log_run_metrics(
    cfg: Config,
    run_id: str,
    metrics: dict[str, float],
    artifacts: list[Path] | None = None,
    *,
    shards: Path | None = None,
    kind: str = "",
) -> None:
    """Add final (evaluation) metrics and files to an existing run, e.g. from the evaluate stage, and the
    test split of ``kind`` in ``shards`` as its evaluation dataset."""
    import mlflow

    configure(cfg)
    client = mlflow.MlflowClient()
    ts = mlflow.utils.time.get_current_time_millis()
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), ts, 0) for k, v in sorted(metrics.items())])
    for path in artifacts or []:
        client.log_artifact(run_id, str(path), "evaluation")
    if shards is not None:
        log_dataset(client, run_id, shard_dataset(shards, kind, "test"), SPLIT_CONTEXT["test"])


def read_run_json(model_dir: Path) -> dict[str, Any]:
    """A model directory's ``run.json`` (its training run id, experiment and tracking URI)."""
    path = Path(model_dir) / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read training run record ({exc})") from None
