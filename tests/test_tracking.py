"""MLflow run handling: params once, resume of the same run, lineage and source tags, dataset inputs, the
experiment kind, system metrics, tracking URI precedence."""

from __future__ import annotations

import getpass
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest

from pipeline import config, tracking
from tests.conftest import TINY

CONTEXT = "mlflow.data.context"


def test_tracking_uri_env_overrides_params(tiny_cfg: config.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri(tiny_cfg) == "http://127.0.0.1:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(tiny_cfg) == "sqlite:///mlflow.db"


def test_run_resumes_without_relogging_params(tiny_cfg: config.Config, tmp_path: Path) -> None:
    params = tracking.stage_params(tiny_cfg, "gan")
    first = tracking.RunLogger(tiny_cfg, "train_gan", enabled=True)
    run_id = first.start(params, {"world_size": "2"})
    first.log_metrics({"loss_d": 1.0}, step=1)
    first.log_metrics({"loss_d": 0.9, "val_fid": 80.0}, step=2)  # after the checkpoint at step 1, then a crash
    first.end("KILLED")

    again = tracking.RunLogger(tiny_cfg, "train_gan", enabled=True, run_id=run_id)
    assert again.start(params | {"gan.steps": 999}, {"world_size": "2"}) == run_id
    again.log_metrics({"loss_d": 0.8}, step=2)  # replayed from the checkpoint: the run has step 2 already
    again.log_metrics({"loss_d": 0.5}, step=3)
    again.end()

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train_gan"
    assert run.data.params["gan.steps"] == str(tiny_cfg.gan.steps)  # logged once, never overwritten
    assert run.data.params["seed"] == str(tiny_cfg.seed)
    history = client.get_metric_history(run_id, "loss_d")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.9), (3, 0.5)]  # no duplicate steps
    tags = run.data.tags
    assert tags[tracking.TAG_STAGE] == "train_gan" and tags["world_size"] == "2"
    assert tracking.TAG_GIT_COMMIT in tags and tracking.TAG_GIT_DIRTY in tags
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "texture-pipeline"


def test_disabled_logger_on_other_ranks_does_nothing(tiny_cfg: config.Config) -> None:
    logger = tracking.RunLogger(tiny_cfg, "train_gan", enabled=False)
    assert logger.start({"a": 1}, {}) is None
    logger.log_metrics({"x": 1.0}, 1)
    logger.end()
    assert mlflow.MlflowClient().search_experiments(filter_string="name = 'texture-pipeline'") == []


def test_unreachable_server_is_one_clear_error(tiny_cfg: config.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(tracking.UserError, match=r"^MLflow tracking server http://127.0.0.1:9: "):
        tracking.configure(tiny_cfg)


def _inputs(run_id: str) -> list[tuple[str, str, dict[str, str], str]]:
    """(name, digest, source, context) of each dataset input of a run."""
    client = mlflow.MlflowClient()
    out = []
    for entry in client.get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in entry.tags}
        out.append((entry.dataset.name, entry.dataset.digest, json.loads(entry.dataset.source), tags[CONTEXT]))
    return out


def test_training_run_has_source_tags_and_its_dataset_once(tiny_cfg: config.Config, tiny_shards: Path) -> None:
    params = tracking.stage_params(tiny_cfg, "gan")
    first = tracking.RunLogger(tiny_cfg, "train_gan", enabled=True)
    run_id = first.start(params, {}, shards=tiny_shards, kind="patches")
    first.end("KILLED")
    again = tracking.RunLogger(tiny_cfg, "train_gan", enabled=True, run_id=run_id)
    again.start(params, {}, shards=tiny_shards, kind="patches")  # a restart from the checkpoint
    again.end()

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training-runs view
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "stages/train_gan.py" and tags["mlflow.source.type"] == "LOCAL"
    commit = tracking.git_info()[tracking.TAG_GIT_COMMIT]
    assert tags.get("mlflow.source.git.commit") == (None if commit == "unknown" else commit)
    assert tags[tracking.TAG_GIT_COMMIT] == commit  # the project's own lineage tags stay
    assert tags["mlflow.user"] == getpass.getuser()

    manifest_sha = tracking.file_sha256(tiny_shards / "manifest.json")
    expected = ("patches/train", manifest_sha[:16], {"uri": str(tiny_shards.resolve())}, "training")
    assert _inputs(run_id) == [expected]  # logged once although the run started twice
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.source_type == "local"
    side = TINY["data.patch_size"]
    schema = {c["name"]: c["tensor-spec"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
    assert schema == {
        "image": {"dtype": "uint8", "shape": [-1, side, side, 3]},
        "class": {"dtype": "int64", "shape": [-1]},
    }


def test_evaluation_logs_the_test_split_once(tiny_cfg: config.Config, tiny_shards: Path) -> None:
    logger = tracking.RunLogger(tiny_cfg, "train_segmenter", enabled=True)
    run_id = logger.start({}, {}, shards=tiny_shards, kind="mosaics")
    logger.end()
    for _ in range(2):  # evaluate re-run on the same models
        tracking.log_run_metrics(tiny_cfg, run_id, {"test_miou": 0.5}, shards=tiny_shards, kind="mosaics")
    digest = tracking.file_sha256(tiny_shards / "manifest.json")[:16]
    names = sorted((name, d, context) for name, d, _, context in _inputs(run_id))
    assert names == [("mosaics/test", digest, "evaluation"), ("mosaics/train", digest, "training")]


def test_existing_experiment_gets_the_training_kind_and_keeps_another(tiny_cfg: config.Config) -> None:
    client = mlflow.MlflowClient()
    untagged = client.create_experiment(tiny_cfg.mlflow.experiment)  # as an older version of the pipeline left it
    tracking.configure(tiny_cfg)
    assert client.get_experiment(untagged).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(untagged, "mlflow.experimentKind", "finetuning")  # a user's choice
    tracking.configure(tiny_cfg)
    assert client.get_experiment(untagged).tags["mlflow.experimentKind"] == "finetuning"


def test_system_metrics_without_their_dependency_is_one_clear_error(
    tiny_params: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config.load(tiny_params({"mlflow.system_metrics": True}))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # importlib finds no such module
    logger = tracking.RunLogger(cfg, "train_gan", enabled=True)
    with pytest.raises(tracking.UserError) as err:
        logger.start({}, {})
    message = str(err.value)
    assert "\n" not in message and "mlflow.system_metrics" in message and "nvidia-ml-py" in message
    assert "texture-pipeline[system-metrics]" in message
    assert mlflow.MlflowClient().search_runs([]) == []  # no run left RUNNING


def test_system_metrics_are_logged_on_and_off(
    tiny_params: Callable[..., Path], tiny_cfg: config.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in tracking.SYSTEM_METRICS_MODULES:
        pytest.importorskip(module, reason="pip install '.[system-metrics]'")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    cfg = config.load(tiny_params({"mlflow.system_metrics": True}))
    client = mlflow.MlflowClient()

    def steps_once_past(run_id: str, step: int) -> list[int]:
        """Steps of the CPU metric once MLflow's monitor has published one after ``step`` (waits up to a minute)."""
        deadline = time.monotonic() + 60
        while True:
            steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
            if steps and max(steps) > step:
                return steps
            assert time.monotonic() < deadline, f"no system metrics after step {step} within 60 s"
            time.sleep(0.1)

    logger = tracking.RunLogger(cfg, "train_gan", enabled=True)
    run_id = logger.start({}, {})
    steps_once_past(run_id, -1)
    logger.end()
    keys = set(client.get_run(run_id).data.metrics)
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage"} <= keys
    before = max(m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    resumed = tracking.RunLogger(cfg, "train_gan", enabled=True, run_id=run_id)
    resumed.start({}, {})
    steps_once_past(run_id, before)
    resumed.end()
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert steps == list(range(len(steps)))  # the resumed run goes on after the last step: no step twice

    plain = tracking.RunLogger(tiny_cfg, "train_gan", enabled=True)  # the default: off
    plain_id = plain.start({}, {})
    plain.end()
    assert not any(k.startswith("system/") for k in client.get_run(plain_id).data.metrics)
