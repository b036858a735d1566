"""A throwaway team stack on 127.0.0.1 for integration tests: PostgreSQL, an S3 server, ``mlflow server``.

The same shape as ``compose.yaml`` (docs/scaling.md), without containers: a PostgreSQL cluster in a
temp dir (run as ``nobody`` when the tests run as root, since postgres refuses root), moto's S3
server, and ``mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://...
--serve-artifacts`` with ``MLFLOW_S3_ENDPOINT_URL`` pointing at it, optionally with the
``basic-auth`` app. Every wait is bounded and every process is stopped at teardown (the MLflow servers after their
module, PostgreSQL and S3 at the end of the session).
Test modules load these fixtures with ``pytest_plugins = ["tests.team_stack"]``.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

START_TIMEOUT_S = 240.0  # mlflow server: imports + schema migrations on 2 busy cores
STOP_TIMEOUT_S = 15.0
S3_REGION = "us-east-1"
# Client-side env that must never leak from the test process into a server (or the other way).
_CLIENT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
SETUP_HINT = "run scripts/ci-services.sh (installs Debian's postgresql) and pip install -e '.[team]'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until(
    ready: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll ``ready`` until true; fail with the log tail when ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} while starting:\n{_log_tail(log)}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.3)
    pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{_log_tail(log)}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except urllib.error.URLError:
        return False


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL it after :data:`STOP_TIMEOUT_S`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT_S)


@contextlib.contextmanager
def background(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run ``argv`` in its own process group with output in ``log``; stopped on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process(proc)


# ---------------------------------------------------------------- PostgreSQL


def postgres_bin_dir() -> Path | None:
    """Directory of ``initdb``/``pg_ctl``: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return candidates[-1].parent if candidates else None


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str
    host: str = "127.0.0.1"

    def uri(self, database: str, with_password: bool = True) -> str:
        """SQLAlchemy URI; without the password, libpq takes it from ``PGPASSWORD``."""
        secret = f":{self.password}" if with_password else ""
        return f"postgresql://{self.user}{secret}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str, with_password: bool = True) -> str:
        """A new empty database; returns its URI."""
        import psycopg

        with psycopg.connect(self.uri("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name, with_password)


def _unprivileged() -> tuple[list[str], int, int]:
    """(command prefix, uid, gid) to run the server: ``runuser -u nobody --`` when we are root."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    runuser = shutil.which("runuser", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin")
    if runuser is None:
        pytest.skip("running as root and runuser (util-linux) is missing: postgres refuses to run as root")
    nobody = pwd.getpwnam("nobody")
    return [runuser, "-u", "nobody", "--"], nobody.pw_uid, nobody.pw_gid


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (password auth), removed afterwards."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL server binaries (initdb) not found: {SETUP_HINT}")
    # SQLAlchemy 2.1 maps postgresql:// to psycopg (3), as MLflow's server does.
    pytest.importorskip("psycopg", reason=f"psycopg missing: {SETUP_HINT}")
    prefix, uid, gid = _unprivileged()
    # Not under pytest's tmp dir: that one is private to the test user, and the server may run as nobody.
    base = Path(tempfile.mkdtemp(prefix="pgtest-"))
    password = secrets.token_urlsafe(16)
    (base / "pwfile").write_text(password + "\n")
    for path in (base, base / "pwfile"):
        os.chown(path, uid, gid)
    data, log = base / "data", base / "server.log"
    pg = Postgres(port=free_port(), user="mlflow", password=password)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}

    def pg_run(*args: str, timeout: float = START_TIMEOUT_S) -> None:
        cmd = [*prefix, str(bin_dir / args[0]), *args[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=base)
        if res.returncode:
            pytest.fail(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}\n{_log_tail(log)}")

    try:
        pg_run("initdb", "-D", str(data), "-U", pg.user, f"--pwfile={base / 'pwfile'}", "--auth=scram-sha-256",
               "-E", "UTF8", "--locale=C", "--no-sync")  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {base} -c fsync=off -c max_connections=200"
        pg_run("pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", str(int(START_TIMEOUT_S)), "start")
        yield pg
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                               capture_output=True, env=env, timeout=STOP_TIMEOUT_S, cwd=base)  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- S3 (moto server)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this S3 server (credentials never go into a config file)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": S3_REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=S3_REGION,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3-compatible server (in-memory) on a free local port."""
    pytest.importorskip("moto.server", reason=f"moto[server] missing: {SETUP_HINT}")
    pytest.importorskip("boto3", reason=f"boto3 missing: {SETUP_HINT}")
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with background(argv, log) as proc:
        endpoint = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{endpoint}/moto-api/"), "moto S3 server", START_TIMEOUT_S, proc, log)
        yield S3Server(endpoint, access_key="team-stack-test", secret_key=secrets.token_hex(16))


# ---------------------------------------------------------------- mlflow server


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    bucket: str
    artifacts_prefix: str
    log: Path
    admin: tuple[str, str] | None = field(default=None, repr=False)  # (username, password) with basic-auth


def server_env(pg: Postgres, s3: S3Server, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment, wired like compose.yaml's ``mlflow`` service."""
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV}
    # PGPASSWORD keeps the password out of the store URIs; the job runner (GenAI scorers, trace
    # archival) is extra processes this pipeline never uses.
    return env | s3.env | {"PGPASSWORD": pg.password, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | (extra or {})


def compose_auth_config(path: Path, database_uri: str) -> Path:
    """compose.yaml's basic-auth ini (``configs.mlflow_auth_ini``), pointed at ``database_uri``."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    ini = configparser.ConfigParser()
    ini.read_string(compose["configs"]["mlflow_auth_ini"]["content"])
    ini["mlflow"]["database_uri"] = database_uri
    with path.open("w") as f:
        ini.write(f)
    return path


@contextlib.contextmanager
def mlflow_server_process(
    workdir: Path, pg: Postgres, database: str, s3: S3Server, *, workers: int, auth: bool = False
) -> Iterator[MlflowServer]:
    """``mlflow server`` on PostgreSQL with proxied S3 artifacts; ``auth`` adds ``--app-name basic-auth``."""
    port = free_port()
    bucket = s3.create_bucket(database.replace("_", "-"))
    prefix = "mlartifacts"
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", pg.create_database(database, with_password=False),
        "--artifacts-destination", f"s3://{bucket}/{prefix}",
        "--serve-artifacts",
        # uvicorn restarts a worker that misses a 5 s heartbeat, e.g. still importing on a loaded machine.
        "--uvicorn-opts", "--timeout-worker-healthcheck 60 --timeout-graceful-shutdown 5",
    ]  # fmt: skip
    extra: dict[str, str] = {}
    admin = None
    if auth:
        argv += ["--app-name", "basic-auth"]
        users_db = pg.create_database(f"{database}_users", with_password=False)
        admin = ("admin", secrets.token_urlsafe(16))
        extra = {
            "MLFLOW_AUTH_CONFIG_PATH": str(compose_auth_config(workdir / "basic_auth.ini", users_db)),
            "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
    log = workdir / "mlflow-server.log"
    with background(argv, log, env=server_env(pg, s3, extra)) as proc:
        uri = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{uri}/health"), "mlflow server", START_TIMEOUT_S, proc, log)
        yield MlflowServer(uri=uri, bucket=bucket, artifacts_prefix=prefix, log=log, admin=admin)


@pytest.fixture(scope="module")
def team_mlflow_server(
    pg_cluster: Postgres, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """An open team server: PostgreSQL backend store, S3 artifacts served through the server."""
    workdir = tmp_path_factory.mktemp("mlflow-open")
    with mlflow_server_process(workdir, pg_cluster, "mlflow_open", s3_server, workers=2) as server:
        yield server


@pytest.fixture(scope="module")
def team_mlflow_auth_server(
    pg_cluster: Postgres, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """The same server behind MLflow's ``basic-auth`` app (compose.yaml's settings); users in PostgreSQL too."""
    pytest.importorskip("flask_wtf", reason=f"mlflow[auth] (Flask-WTF) missing: {SETUP_HINT}")
    workdir = tmp_path_factory.mktemp("mlflow-auth")
    with mlflow_server_process(workdir, pg_cluster, "mlflow_auth", s3_server, workers=1, auth=True) as server:
        yield server


# ---------------------------------------------------------------- concurrent writers (run in child processes)


def concurrent_writer(
    uri: str, experiment_id: str, model: str, writer: int, steps: int, versions: int, barrier: Any
) -> None:
    """One of several processes hitting the server at once: a run with ``steps`` metrics, then ``versions`` versions."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(experiment_id, run_name=f"writer-{writer}", tags={"writer": str(writer)}).info.run_id
    barrier.wait(timeout=60)  # everyone writes at the same time
    for step in range(steps):
        ts = mlflow.utils.time.get_current_time_millis()
        metrics = [Metric("loss", 1.0 / (step + 1), ts, step), Metric("writer", writer, ts, step)]
        client.log_batch(run_id, metrics=metrics)
    for k in range(versions):
        tags = {"writer": str(writer), "k": str(k)}
        client.create_model_version(model, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags)
    client.set_terminated(run_id)
