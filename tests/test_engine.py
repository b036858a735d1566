"""Shared training-loop pieces: NaN guard, graceful stop, history CSV."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
import torch

from pipeline import engine


def test_check_finite_names_the_value(tmp_path: Path) -> None:
    engine.check_finite({"loss_d": 0.5, "loss_g": torch.tensor(1.0)}, 3, tmp_path / "last.pt")
    with pytest.raises(engine.NonFiniteLossError, match=r"step 7: loss_g is nan; .*last.pt"):
        engine.check_finite({"loss_d": 0.5, "loss_g": float("nan")}, 7, tmp_path / "last.pt")


def test_graceful_stop_turns_sigterm_into_a_flag() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with engine.GracefulStop() as stop:
        assert not stop.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.should_stop(torch.device("cpu"))
    assert signal.getsignal(signal.SIGTERM) is before


def test_history_csv_has_union_of_columns(tmp_path: Path) -> None:
    history = engine.History()
    history.append(1, {"loss": 0.5})
    history.append(2, {"loss": 0.4, "val_fid": 80.0})
    history.write_csv(tmp_path / "history.csv")
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert rows == [{"step": "1", "loss": "0.5", "val_fid": ""}, {"step": "2", "loss": "0.4", "val_fid": "80.0"}]
    assert engine.History(history.rows).rows == history.rows
