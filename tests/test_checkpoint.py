"""Atomic checkpoints, weights-only loading, RNG capture and params-bound resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save({"model": model.state_dict(), "step": 5}, path)
    loaded = checkpoint.load(path)
    assert loaded["step"] == 5 and torch.equal(loaded["model"]["weight"], model.weight.detach())
    assert not list(path.parent.glob("*.tmp")), "temp files must not stay behind"


def test_weights_only_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": object()}, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"evil\.pt: cannot load checkpoint"):
        checkpoint.load(path)


def test_corrupt_and_missing_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=r"last\.pt: cannot load checkpoint"):
        checkpoint.load(bad)
    with pytest.raises(checkpoint.CheckpointError, match=r"nope\.pt: checkpoint not found"):
        checkpoint.load(tmp_path / "nope.pt")


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save({"step": 2, "x": Boom()}, path)
    assert checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_resume_state_checks_params_hash(tmp_path: Path) -> None:
    assert checkpoint.resume_state(tmp_path, "h1", "error") is None
    checkpoint.save({"step": 3, "params_hash": "h1"}, tmp_path / checkpoint.LAST)
    assert checkpoint.resume_state(tmp_path, "h1", "error")["step"] == 3
    assert checkpoint.resume_state(tmp_path, "h2", "restart") is None
    with pytest.raises(checkpoint.CheckpointError, match="made with other params"):
        checkpoint.resume_state(tmp_path, "h2", "error")


def _hold_lock_in_child(directory: Path) -> subprocess.Popen:
    """A process that takes ``directory``'s stage lock, says so on stdout, and waits to be killed."""
    code = f"from pipeline import checkpoint; checkpoint.StageLock({str(directory)!r}).acquire(); print(1, flush=True)"
    child = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(600)"], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"1\n"
    return child


def test_stage_lock_refuses_a_second_holder_naming_the_first(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    checkpoint.StageLock(ckpt).check_free()  # no lock file yet: free, and nothing is created
    assert not ckpt.exists()
    child = _hold_lock_in_child(ckpt)
    try:
        holder = rf"{ckpt}: locked by pid {child.pid} on host {socket.gethostname()} \(started \d{{4}}-"
        with pytest.raises(checkpoint.StageLockedError, match=holder):
            checkpoint.StageLock(ckpt).acquire()
        with pytest.raises(checkpoint.StageLockedError, match=holder):
            checkpoint.StageLock(ckpt).check_free()
    finally:
        child.kill()
        child.wait()
    # The kernel dropped the dead holder's flock: the next run takes the lock over and records itself.
    checkpoint.StageLock(ckpt).check_free()
    checkpoint.hold_stage_lock(ckpt)
    checkpoint.hold_stage_lock(ckpt)  # the same process again (a stage run twice in-process): still the holder
    assert json.loads((ckpt / checkpoint.LOCK).read_text())["pid"] == os.getpid()
