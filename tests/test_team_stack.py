"""The team stack for real: MLflow on PostgreSQL with S3 artifacts, concurrent writers, and basic-auth."""

from __future__ import annotations

import json
import multiprocessing
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client

from pipeline import config, registry, tracking
from pipeline.errors import UserError
from tests.conftest import ROOT

if TYPE_CHECKING:
    from tests.team_stack import MlflowServer, S3Server

pytest_plugins = ["tests.team_stack"]
pytestmark = pytest.mark.slow

WRITERS, STEPS, VERSIONS = 4, 40, 3
JOIN_TIMEOUT_S = 180.0
STAGE_TIMEOUT_S = 300
# metrics/*.json as the evaluate stage writes them, good enough to pass params.yaml's register gates.
EVALUATION = {
    "gan": {"fid": 90.0, "fid_ratio": 0.3, "recall": 0.2, "diversity": 0.9, "fid_features": "texture"}
    | {"class_fidelity": 0.5},
    "segmenter": {"miou": 0.7},
}


def _log_a_training_run(cfg: config.Config, tmp_path: Path) -> tuple[str, Path]:
    """What a training stage does on rank 0, through the pipeline's own tracking layer."""
    logger = tracking.RunLogger(cfg, "train_segmenter", enabled=True)
    run_id = logger.start(tracking.stage_params(cfg, "segmenter"), {"world_size": "2", "backend": "gloo"})
    for step in range(1, 6):
        logger.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step=step)
    logger.log_image(np.full((8, 8, 3), 200, dtype=np.uint8), "samples/step5.png")
    history = tmp_path / "history.csv"
    history.write_text("step,loss\n1,1.0\n5,0.2\n")
    logger.log_artifact(history)
    logger.end()
    tracking.log_run_metrics(cfg, run_id, {"miou": 0.61}, [history])
    return run_id, history


def test_run_artifacts_and_registry_on_postgres_and_s3(
    team_mlflow_server: MlflowServer, s3_server: S3Server, tiny_cfg: config.Config, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_mlflow_server.uri)
    run_id, history = _log_a_training_run(tiny_cfg, tmp_path)

    client = mlflow.MlflowClient(team_mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["segmenter.lr"] == str(tiny_cfg.segmenter.lr)
    assert run.data.tags[tracking.TAG_STAGE] == "train_segmenter" and run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
    assert run.data.metrics["miou"] == pytest.approx(0.61)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == tiny_cfg.mlflow.experiment
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server, not a client path

    # The artifacts went through the server into the S3 bucket, and come back byte for byte.
    keys = s3_server.keys(team_mlflow_server.bucket, team_mlflow_server.artifacts_prefix)
    assert any(k.endswith(f"{run_id}/artifacts/history.csv") for k in keys), keys
    assert any(k.endswith(f"{run_id}/artifacts/evaluation/history.csv") for k in keys), keys
    assert any(k.endswith(f"{run_id}/artifacts/samples/step5.png") for k in keys), keys
    fetched = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="history.csv", dst_path=str(tmp_path / "dl")
    )
    assert Path(fetched).read_bytes() == history.read_bytes()

    # Registry: a version linked to the run, tagged with its metrics, and the champion alias.
    name = "texture-segmenter"
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id, tags={"miou": "0.61"})
    client.set_registered_model_alias(name, "champion", mv.version)
    champion = client.get_model_version_by_alias(name, "champion")
    assert (champion.version, champion.run_id, champion.tags["miou"]) == ("1", run_id, "0.61")


def test_concurrent_writers_lose_nothing(team_mlflow_server: MlflowServer) -> None:
    from tests.team_stack import concurrent_writer

    client = mlflow.MlflowClient(team_mlflow_server.uri)
    exp_id = client.create_experiment("concurrency")
    model = "texture-concurrency"
    client.create_registered_model(model)

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    procs = [
        ctx.Process(target=concurrent_writer, args=(team_mlflow_server.uri, exp_id, model, w, STEPS, VERSIONS, barrier))
        for w in range(WRITERS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    assert not hung, f"writers still running after {JOIN_TIMEOUT_S:.0f} s: {hung}"
    assert [p.exitcode for p in procs] == [0] * WRITERS, f"a writer failed, see the server log {team_mlflow_server.log}"

    runs = client.search_runs([exp_id], max_results=100)
    assert sorted(r.data.tags["writer"] for r in runs) == [str(w) for w in range(WRITERS)]
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(STEPS)), r.data.tags["writer"]
        assert r.info.status == "FINISHED"

    versions = client.search_model_versions(f"name = '{model}'", max_results=1000)
    numbers = sorted(int(v.version) for v in versions)
    assert numbers == list(range(1, WRITERS * VERSIONS + 1))  # no gap, no duplicate
    written = sorted((v.tags["writer"], v.tags["k"]) for v in versions)
    assert written == sorted((str(w), str(k)) for w in range(WRITERS) for k in range(VERSIONS))
    by_run = {r.info.run_id: r.data.tags["writer"] for r in runs}
    assert all(by_run[v.run_id] == v.tags["writer"] for v in versions)


def _as(monkeypatch: pytest.MonkeyPatch, user: str | None, password: str | None) -> None:
    """Set (or clear) the credentials the MLflow client sends."""
    for var, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)


def _refused(call: Callable[[], object], status: int) -> None:
    with pytest.raises(MlflowException) as info:
        call()
    assert info.value.get_http_status_code() == status, str(info.value)


def _trained_models(cfg: config.Config, base: Path) -> dict[str, Path]:
    """What the training and evaluate stages leave for ``register``: untrained models, run.json, metrics."""
    import torch

    from pipeline.checkpoint import atomic_write_json
    from pipeline.models.gan import Generator, save_generator
    from pipeline.models.segmenters import save_segmenter
    from pipeline.models.unet import UNet

    classes = list(cfg.data.classes)
    paths = {}
    for kind, metrics in (
        (
            "gan",
            {
                "fid": 90.0,
                "fid_ratio": 0.3,
                "recall": 0.2,
                "diversity": 0.9,
                "fid_features": "texture",
                "class_fidelity": 0.5,
            },
        ),
        ("segmenter", {"miou": 0.7}),
    ):
        logger = tracking.RunLogger(cfg, f"train_{kind}", enabled=True)
        run_id = logger.start(tracking.stage_params(cfg, kind), {"world_size": "1"})
        logger.log_metrics({"loss": 1.0}, step=1)
        logger.end()
        torch.manual_seed(0)
        out = base / "models" / kind
        meta = {"classes": classes, "run_id": run_id, "step": 1}
        if kind == "gan":
            save_generator(out / "generator.pt", Generator(len(classes), z_dim=8, channels=8, image_size=16), meta)
        else:
            save_segmenter(out / "model.pt", UNet(len(classes), channels=4, depth=2), meta)
        record = {"run_id": run_id, "experiment": cfg.mlflow.experiment, "tracking_uri": tracking.tracking_uri(cfg)}
        atomic_write_json(out / "run.json", record)
        atomic_write_json(base / "metrics" / f"{kind}.json", metrics)
        paths[f"--{kind}-model"], paths[f"--{kind}-metrics"] = out, base / "metrics" / f"{kind}.json"
    return paths


def test_basic_auth_pipeline_user_registers_others_are_refused(
    team_mlflow_auth_server: MlflowServer, s3_server: S3Server, tiny_params, tmp_path: Path, monkeypatch
) -> None:
    uri = team_mlflow_auth_server.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    admin_user, admin_password = team_mlflow_auth_server.admin
    users = {"pipeline": secrets.token_urlsafe(16), "reader": secrets.token_urlsafe(16)}
    _as(monkeypatch, admin_user, admin_password)
    auth = get_app_client("basic-auth", tracking_uri=uri)
    for user, password in users.items():
        auth.create_user(user, password)

    # The pipeline's user: training runs, then the real register stage, credentials from the environment only.
    _as(monkeypatch, "pipeline", users["pipeline"])
    params = tiny_params()
    cfg = config.load(params)
    inputs = _trained_models(cfg, tmp_path)
    argv = [sys.executable, str(ROOT / "stages" / "register.py"), "--params", str(params), "--out", "registry"]
    argv += [str(v) for pair in inputs.items() for v in pair]
    res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    name = registry.MODEL_NAMES["segmenter"]
    record = json.loads((tmp_path / "registry" / f"{name}.json").read_text())
    assert (record["version"], record["aliases"]) == ("1", ["champion"])
    client = mlflow.MlflowClient(uri)
    v1 = client.get_model_version(name, "1")
    model_files = [k for k in s3_server.keys(team_mlflow_auth_server.bucket) if k.endswith("/MLmodel")]
    assert len(model_files) == 2, model_files  # both pyfunc models went through the server into S3
    v2 = client.create_model_version(name, source=f"runs:/{v1.run_id}/model", run_id=v1.run_id)
    exp_id = client.get_run(v1.run_id).info.experiment_id

    _as(monkeypatch, admin_user, admin_password)
    auth.grant_user_permission("reader", "registered_model", name, "READ")

    def attempts() -> list[Callable[[], object]]:
        return [
            lambda: client.create_run(exp_id),
            lambda: client.create_model_version(name, source=f"runs:/{v1.run_id}/model", run_id=v1.run_id),
            lambda: client.set_registered_model_alias(name, "champion", v2.version),
        ]

    # No credentials, or a wrong password: 401 on every write, and the pipeline fails with one clear line.
    for user, password in ((None, None), ("pipeline", "wrong-password-123")):
        _as(monkeypatch, user, password)
        for attempt in attempts():
            _refused(attempt, 401)
        with pytest.raises(UserError, match=r"^MLflow tracking server http://127\.0\.0\.1:\d+: "):
            tracking.RunLogger(cfg, "train_gan", enabled=True).start({}, {})

    # The reader sees the champion but cannot move it (not even with `promote --force`), nor write anything.
    _as(monkeypatch, "reader", users["reader"])
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    for attempt in attempts():
        _refused(attempt, 403)
    with pytest.raises(UserError, match=r"cannot set alias 'champion'"):
        registry.promote(cfg, name, v2.version, "champion", force=True)

    # Nothing of the above reached the stores.
    _as(monkeypatch, admin_user, admin_password)
    assert len(client.search_runs([exp_id])) == 2  # the two training runs
    assert sorted(v.version for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]
    assert client.get_model_version_by_alias(name, "champion").version == "1"
