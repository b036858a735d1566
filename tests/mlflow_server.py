"""pytest plugin: a real ``mlflow server`` on 127.0.0.1 and real training runs to register.

Enable it with ``pytest_plugins = ["tests.mlflow_server"]`` (a test module or tests/conftest.py).

- ``sqlite_mlflow_server`` (session): ``mlflow server`` with a sqlite backend and ``--serve-artifacts`` into a
  temp dir, on a free port; waits for ``/health``; stopped (its whole process group) at the end.
- ``tracking_server`` (per test): ``MLFLOW_TRACKING_URI`` points at that server; the texture models
  are deleted from its registry afterwards so tests never see each other's versions.
- ``fake_training`` (per test): ``fake_training(kind, seed)`` writes an untrained model with the real
  save function plus ``run.json`` for a real MLflow run made by ``pipeline.tracking.RunLogger``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import config, tracking
from pipeline.checkpoint import atomic_write_json
from pipeline.registry import MODEL_NAMES

VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 180  # a cold mlflow import on a busy 2-core machine takes tens of seconds


@dataclass(frozen=True)
class MlflowServer:
    url: str
    backend_uri: str
    artifacts: Path
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: the venv's bin/ first on PATH (``mlflow models serve`` starts
    ``uvicorn`` by name), no telemetry, no background job runner."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env | extra


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def background(cmd: list[str], log: Path, ready_url: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run ``cmd`` in its own process group until the block ends; ready once ``ready_url`` answers."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env or child_env(), start_new_session=True
        )
    try:
        wait_for_http(ready_url, proc, log, STARTUP_TIMEOUT_S)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture(scope="session")
def sqlite_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    base = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = MlflowServer(
        url=f"http://127.0.0.1:{port}",
        backend_uri=f"sqlite:///{base / 'mlflow.db'}",
        artifacts=base / "artifacts",
        log=base / "server.log",
    )
    cmd = [
        str(VENV_BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        server.backend_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(server.artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with background(cmd, server.log, f"{server.url}/health"):
        yield server


@pytest.fixture
def tracking_server(sqlite_mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowServer]:
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_mlflow_server.url)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(sqlite_mlflow_server.url)  # the client caches the URI in-process (see conftest.py)
    yield sqlite_mlflow_server
    client = mlflow.MlflowClient(sqlite_mlflow_server.url)
    for name in MODEL_NAMES.values():
        with contextlib.suppress(MlflowException):  # this test registered no such model
            client.delete_registered_model(name)
    mlflow.set_tracking_uri(None)  # leave no process-wide URI pointing at this server


FakeTraining = Callable[..., Path]


@pytest.fixture
def fake_training(tmp_path: Path, tracking_server: MlflowServer) -> FakeTraining:
    """``fake_training("segmenter" | "gan", seed=0) -> model dir`` with an untrained model, run.json and a run."""
    import torch

    from tests.conftest import write_params

    cfg = config.load(write_params(tmp_path))
    classes = list(cfg.data.classes)

    def make(kind: str, seed: int = 0, directory: Path | None = None) -> Path:
        stage = f"train_{kind}"
        logger = tracking.RunLogger(cfg, stage, enabled=True)
        run_id = logger.start(
            tracking.stage_params(cfg, kind),
            {tracking.TAG_MANIFEST: f"manifest-{seed}", tracking.TAG_PARAMS_HASH: f"params-{seed}"},
        )
        logger.log_metrics({"loss": 1.0 / (seed + 1)}, step=1)
        logger.end()
        out = directory or tmp_path / f"{kind}-{seed}"
        torch.manual_seed(seed)
        meta = {"classes": classes, "run_id": run_id, "step": 1}
        if kind == "gan":
            from pipeline.models.gan import Generator, save_generator

            save_generator(out / "generator.pt", Generator(len(classes), z_dim=8, channels=8, image_size=16), meta)
        else:
            from pipeline.models.segmenters import save_segmenter
            from pipeline.models.unet import UNet

            save_segmenter(out / "model.pt", UNet(len(classes), channels=4, depth=2), meta)
        record = {"run_id": run_id, "experiment": cfg.mlflow.experiment, "tracking_uri": tracking.tracking_uri(cfg)}
        atomic_write_json(out / "run.json", record)
        return out

    return make
