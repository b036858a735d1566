"""Drills on the GAN stage started as dvc.yaml starts it (``python -m pipeline.launch``): a SIGKILL of the
launcher's process group leaves no rank or loader worker behind and the rerun resumes into the same MLflow run
without duplicated steps; a second run on a locked stage is refused naming the holder; user errors print one
line once, without a torchrun traceback or restart."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline import checkpoint
from pipeline.models.features import TextureFeatureNet, save_feature_extractor
from tests import processes
from tests.conftest import ROOT, write_params

pytestmark = pytest.mark.slow

STAGE = ROOT / "stages" / "train_gan.py"
LAUNCH = [sys.executable, "-m", "pipeline.launch"]
# Long enough to be killed mid-run, short enough for the rerun to finish in seconds.
LONG = {"gan.steps": 300, "gan.checkpoint_every": 10, "gan.log_every": 5, "gan.eval_every": 100}
STEP_METRICS = ("loss_d", "loss_g", "d_real", "d_fake", "samples_per_s", "val_fid")


@pytest.fixture(scope="module")
def extractor(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained (seeded) texture feature net: enough for the val FID plumbing."""
    classes = json.loads((tiny_shards / "manifest.json").read_text())["classes"]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("features") / "extractor.pt"
    save_feature_extractor(path, TextureFeatureNet(len(classes), 16), {"classes": classes})
    return path


def _gan(work: Path, shards: Path, features: Path, launcher: list[str] | None = None) -> list[str]:
    """The train_gan command of dvc.yaml on ``work``'s params, under ``launcher`` (default: pipeline.launch, 2
    ranks, one restart allowed)."""
    launcher = [*LAUNCH, "--nproc", "2", "--max-restarts", "1"] if launcher is None else launcher
    return [
        *launcher, str(STAGE),
        "--params", str(work / "params.yaml"),
        "--shards", str(shards),
        "--features", str(features),
        "--out", str(work / "out"),
        "--checkpoints", str(work / "ckpt"),
    ]  # fmt: skip


def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, state)} of every process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            found[int(entry.name)] = (int(fields[1]), fields[0])
    return found


def _alive(pids: set[int]) -> set[int]:
    """The pids still running (a zombie has finished: it only waits for its new parent to reap it)."""
    table = _processes()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def _environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def _tagged(tag: str) -> set[int]:
    """Every running process with ``DRILL=tag`` in its environment (inherited by everything the job starts)."""
    found = set()
    for pid in _alive(set(_processes())):
        with contextlib.suppress(OSError):
            if f"DRILL={tag}".encode() in _environ(pid):
                found.add(pid)
    return found


def _wait_until(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _step(last: Path) -> int:
    try:
        return int(checkpoint.load(last)["step"])
    except checkpoint.CheckpointError:  # not written yet
        return -1


def _ranks_and_workers(agent: int) -> tuple[set[int], set[int]]:
    """(the agent's children: the ranks, their children: the DataLoader workers)."""
    table = _processes()
    ranks = {p for p, (ppid, _) in table.items() if ppid == agent}
    return ranks, {p for p, (ppid, _) in table.items() if ppid in ranks}


def test_killed_launcher_leaves_no_process_and_the_rerun_resumes(
    tiny_shards: Path, extractor: Path, tmp_path: Path
) -> None:
    write_params(tmp_path, LONG | {"train.num_workers": 1})
    last, log, tag = tmp_path / "ckpt" / checkpoint.LAST, tmp_path / "stderr.log", uuid.uuid4().hex
    with processes.started(_gan(tmp_path, tiny_shards, extractor), log, env={"DRILL": tag}) as proc:
        _wait_until(lambda: _step(last) >= 10, "the step-10 checkpoint", proc)
        _wait_until(lambda: len(_ranks_and_workers(proc.pid)[1]) >= 2, "a loader worker per rank", proc)
        ranks, workers = _ranks_and_workers(proc.pid)  # the launcher runs the torchrun agent
        assert len(ranks) == 2
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group: not the ranks, torchrun puts them in their own
        proc.wait()
        _wait_until(lambda: not _alive(ranks | workers) and not _tagged(tag), "the job's processes to exit", timeout=5)
    step = int(checkpoint.load(last)["step"])  # the last complete checkpoint
    assert 10 <= step < LONG["gan.steps"]

    status, err = processes.run(_gan(tmp_path, tiny_shards, extractor), log)
    assert status == 0, err[-3000:]
    assert f"train_gan: resuming from {last} at step {step}" in err
    assert checkpoint.load(last)["step"] == LONG["gan.steps"]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("texture-pipeline").experiment_id])
    for key in STEP_METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps and len(steps) == len(set(steps)), (key, sorted(steps))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_fid")) == [0, 100, 200, 300]


def test_a_second_run_on_a_locked_stage_is_refused_naming_the_holder(
    tiny_shards: Path, extractor: Path, tmp_path: Path
) -> None:
    write_params(tmp_path, LONG | {"gan.steps": 100_000})
    ckpt, log = tmp_path / "ckpt", tmp_path / "first.log"
    with processes.started(_gan(tmp_path, tiny_shards, extractor), log) as first:
        _wait_until(lambda: (ckpt / checkpoint.LAST).is_file(), "the first checkpoint", first)
        (rank0,) = (p for p in _ranks_and_workers(first.pid)[0] if b"RANK=0" in _environ(p))
        holder = f"train_gan: error: {ckpt}: locked by pid {rank0} on host {socket.gethostname()} (started "
        # The launcher's check before torchrun starts, and rank 0's lock in one plain process: one line each.
        for name, launcher in (("launch", None), ("plain", [sys.executable])):
            status, err = processes.run(_gan(tmp_path, tiny_shards, extractor, launcher), tmp_path / f"{name}.log")
            assert status == 2 and err.strip().startswith(holder) and err.count("\n") == 1, (name, err[-3000:])
        # Under bare torchrun (no launcher check) rank 1 must stop with rank 0 instead of waiting for it.
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        status, err = processes.run(_gan(tmp_path, tiny_shards, extractor, torchrun), tmp_path / "torchrun.log")
        assert status != 0 and holder in err, err[-3000:]
        assert first.poll() is None and _step(ckpt / checkpoint.LAST) >= 0  # the first run trains on


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"gan.nope": 1}, "gan.nope: unknown key"),
        ({"gan.lr_g": "fast"}, "gan.lr_g: expected"),
        ({"gan.batch_size": 7}, "gan.batch_size: 7 is not divisible by the world size 2"),
    ],
)
def test_user_errors_of_a_training_stage_are_one_line_before_torchrun(
    overrides: dict, expected: str, tiny_shards: Path, extractor: Path, tmp_path: Path
) -> None:
    params = write_params(tmp_path, overrides)
    status, err = processes.run(_gan(tmp_path, tiny_shards, extractor), tmp_path / "stderr.log")
    assert status == 2
    assert err.strip() == err.strip().splitlines()[0]  # nothing else: no torchrun start, no traceback
    assert err.startswith(f"train_gan: error: {params}: {expected}"), err


def test_a_worker_user_error_is_printed_once_and_not_retried(tmp_path: Path) -> None:
    attempts = tmp_path / "attempts.txt"
    script = [str(ROOT / "tests" / "scripts" / "worker_exit.py"), "user", str(attempts)]
    status, err = processes.run([*LAUNCH, "--nproc", "2", "--max-restarts", "2", *script], tmp_path / "stderr.log")
    assert status == 2
    assert err.count(f"worker_exit: error: {attempts}: a mistake the user can fix\n") == 1
    assert "Traceback" not in err and "ChildFailedError" not in err, err
    assert {line.split()[1] for line in attempts.read_text().splitlines()} == {"0"}  # first attempt only


def test_a_worker_crash_is_retried_and_keeps_torchruns_report(tmp_path: Path) -> None:
    attempts = tmp_path / "attempts.txt"
    script = [str(ROOT / "tests" / "scripts" / "worker_exit.py"), "crash", str(attempts)]
    status, err = processes.run([*LAUNCH, "--nproc", "2", "--max-restarts", "1", *script], tmp_path / "stderr.log")
    assert status == 1
    assert "RuntimeError: a bug" in err and "ChildFailedError" in err
    assert {line.split()[1] for line in attempts.read_text().splitlines()} == {"0", "1"}
