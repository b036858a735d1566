"""MLflow run handling: params once, resume of the same run, lineage tags, tracking URI precedence."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipeline import config, tracking


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
