"""Atomic checkpoints, weights-only loading, RNG capture and params-bound resume."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint


def test_save_load_round_trip_with_rng(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "ckpt" / "last.pt"
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.save({"model": model.state_dict(), "step": 5, "rng": checkpoint.rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    loaded = checkpoint.load(path)
    checkpoint.set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert torch.equal(loaded["model"]["weight"], model.weight.detach())
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
