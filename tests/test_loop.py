"""The one training loop on a toy task: schedule, keep-best, export, data wait in MLflow, stop and exact resume."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from torch import Tensor, nn

from pipeline import checkpoint, config
from pipeline.distributed import DistEnv
from pipeline.engine import EXIT_STOPPED, GracefulStop, NonFiniteLossError, Session
from pipeline.training.loop import Schedule, Task, _Window, derive_seed, run, seeded
from tests.conftest import write_params

CPU = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", None)


class ToyTask(Task):
    """Least squares on a fixed line; 'validation' is the distance to the true weights (lower is better)."""

    stage, sections, data_kind = "train_toy", ("train",), "patches"
    best_metric = "val_error"

    def __init__(self, out_dir: Path, total: int = 12, lr: float = 0.05, delay: float = 0.0) -> None:
        self.out_dir, self.delay = out_dir, delay
        self.schedule = Schedule(total=total, batch_size=4, log_every=2, validate_every=3, checkpoint_every=5)
        self.model = seeded(derive_seed(0, 0), lambda: nn.Linear(1, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.exports: list[dict[str, Any]] = []
        self.stop_at: int | None = None

    def batches(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        step = start
        while True:
            time.sleep(self.delay)
            x = torch.randn(4, 1, generator=torch.Generator().manual_seed(step))
            yield x, 3.0 * x - 1.0
            step += 1

    def step(self, step: int, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        if self.stop_at is not None and step == self.stop_at:
            self.stop.requested = True
        x, y = batch
        loss = ((self.model(x) - y) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def validate(self, step: int) -> dict[str, float]:
        w, b = self.model.weight.item(), self.model.bias.item()
        return {"val_error": abs(w - 3.0) + abs(b + 1.0)}

    def weights(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def export(self, weights: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.exports.append(meta)
        checkpoint.atomic_write_json(self.out_dir / "model.json", {k: v.tolist() for k, v in weights.items()})


def _train(tmp_path: Path, task: ToyTask, name: str = "run") -> Session:
    cfg = config.load(write_params(tmp_path))
    session = Session(cfg, task.stage, task.sections, CPU, tmp_path / name / "ckpt", task.out_dir, _manifest(tmp_path))
    with GracefulStop() as stop:
        task.stop = stop
        run(task, session, CPU, stop, progress=False)
    return session


def _manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"classes": ["a"], "params": {"patch_size": 16}}))
    return path


def test_window_averages_and_measures_the_data_wait() -> None:
    window = _Window()
    window.add({"loss": 1.0}, 4, 0.0)
    window.add({"loss": 3.0}, 4, 0.0)
    time.sleep(0.02)
    row = window.flush()
    assert row["loss"] == 2.0 and row["samples_per_s"] > 0 and row["data_wait"] == 0.0
    window.add({"loss": 1.0}, 4, waited=10.0)  # more than the window's wall time: capped at 1
    assert window.flush()["data_wait"] == 1.0
    assert Schedule.due(6, 3) and not Schedule.due(7, 3) and not Schedule.due(6, 0)


def test_loop_keeps_the_best_logs_data_wait_and_writes_outputs(tmp_path: Path) -> None:
    task = ToyTask(tmp_path / "out", delay=0.01)
    session = _train(tmp_path, task)
    history = list(csv.DictReader((tmp_path / "out" / "history.csv").read_text().splitlines()))
    assert [r["step"] for r in history] == [str(s) for s in range(2, 13) if s % 2 == 0 or s % 3 == 0]
    val = {int(r["step"]): float(r["val_error"]) for r in history if r["val_error"]}
    assert sorted(val) == [3, 6, 9, 12]
    best_step = min(val, key=val.get)
    assert task.exports[-1]["step"] == best_step and task.exports[-1]["val_error"] == val[best_step]
    assert [e["step"] for e in task.exports] == sorted(e["step"] for e in task.exports)  # one export per new best
    run_record = json.loads((tmp_path / "out" / "run.json").read_text())
    client = mlflow.MlflowClient()
    waits = [m.value for m in client.get_metric_history(run_record["run_id"], "data_wait")]
    assert len(waits) == 6 and all(0.0 < w <= 1.0 for w in waits)  # a sleeping loader shows as waiting
    finished = client.get_run(session.run_id)
    assert finished.info.status == "FINISHED"
    assert [d.dataset.name for d in finished.inputs.dataset_inputs] == ["patches/train"]  # the task's data_kind
    assert checkpoint.load(tmp_path / "run" / "ckpt" / "last.pt")["step"] == 12


def test_stop_saves_exits_143_and_resume_matches_a_straight_run(tmp_path: Path) -> None:
    straight = ToyTask(tmp_path / "straight")
    _train(tmp_path, straight, "straight")
    stopped = ToyTask(tmp_path / "stopped")
    stopped.stop_at = 6  # a stop request arrives during step 7 (0-based 6)
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path, stopped, "stopped")
    assert exit_info.value.code == EXIT_STOPPED
    assert checkpoint.load(tmp_path / "stopped" / "ckpt" / "last.pt")["step"] == 7
    resumed = ToyTask(tmp_path / "stopped")
    session = _train(tmp_path, resumed, "stopped")
    a = checkpoint.load(tmp_path / "straight" / "ckpt" / "last.pt")
    b = checkpoint.load(tmp_path / "stopped" / "ckpt" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best"] == b["best"]
    strip = ("samples_per_s", "data_wait")
    assert [{k: v for k, v in r.items() if k not in strip} for r in a["history"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in b["history"]
    ]
    metrics = mlflow.MlflowClient().get_metric_history(session.run_id, "loss")
    assert [m.step for m in metrics] == [2, 4, 6, 8, 10, 12]  # one MLflow run, no step twice


def test_a_finished_checkpoint_trains_afresh(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _train(tmp_path, ToyTask(tmp_path / "out"))
    again = ToyTask(tmp_path / "out")
    _train(tmp_path, again)
    assert "is from a finished run; training from scratch" in capsys.readouterr().err
    assert again.exports[0]["step"] == 3


def test_non_finite_loss_stops_and_marks_the_run_failed(tmp_path: Path) -> None:
    task = ToyTask(tmp_path / "out", lr=1e30)
    with pytest.raises(NonFiniteLossError, match=r"step \d+: loss is (nan|inf)"):
        _train(tmp_path, task)
    (run_info,) = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("texture-pipeline").experiment_id])
    assert run_info.info.status == "FAILED"
