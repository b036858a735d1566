"""Segmenter training: loss, schedule, learning, world-size equivalence, resume, SIGTERM, NaN, outputs + MLflow."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import checkpoint, config
from pipeline.data.loaders import eval_batches
from pipeline.data.shards import load_manifest
from pipeline.distributed import distributed
from pipeline.engine import EXIT_STOPPED, NonFiniteLossError
from pipeline.errors import UserError
from pipeline.metrics.segmentation import ConfusionMatrix
from pipeline.models.segmenters import load_segmenter
from pipeline.models.unet import UNet
from pipeline.training.segmenter import (
    SegmenterStep,
    build_model,
    check_params,
    lr_factor,
    segmentation_loss,
    train_segmenter,
)
from tests.conftest import ROOT

STAGE = ROOT / "stages" / "train_segmenter.py"
WORLD_SCRIPT = ROOT / "tests" / "scripts" / "seg_world.py"
# 3 epochs x 4 steps with a checkpoint every 2 steps: long enough to be stopped part-way.
# With colour and scale augmentation on: their per-step draws must survive a restart too.
RESUMABLE = {
    "segmenter.epochs": 3,
    "segmenter.steps_per_epoch": 4,
    "segmenter.checkpoint_every": 2,
    "segmenter.color_augment": 0.4,
    "segmenter.scale_augment": 0.25,
}
TIMEOUT = 300


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    assert [lr_factor(s, 100, 4, "poly") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, 4, "poly") == 1.0
    assert lr_factor(100, 100, 4, "poly") == 0.0
    assert lr_factor(100, 100, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(52, 100, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(52, 100, 4, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(0, 10, 0, "cosine") == 1.0


def test_loss_is_a_mean_over_images_so_rank_slices_average_to_the_global_loss() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 8, 8, generator=g)
    masks = torch.randint(0, 4, (6, 8, 8), generator=g)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])
    whole, _ = segmentation_loss(logits, masks, 1.0, 0.7, weights)
    halves = [segmentation_loss(logits[i : i + 3], masks[i : i + 3], 1.0, 0.7, weights)[0] for i in (0, 3)]
    torch.testing.assert_close(whole, sum(halves) / 2)
    unweighted, _ = segmentation_loss(logits, masks, 1.0, 0.7)
    assert not torch.allclose(whole, unweighted)


def test_loss_terms_vanish_for_a_confident_correct_prediction() -> None:
    masks = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    logits = 50.0 * torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    loss, terms = segmentation_loss(logits, masks, 1.0, 1.0)
    assert terms["ce"] < 1e-6 and terms["dice"] < 1e-6 and loss < 1e-6
    _, wrong = segmentation_loss(-logits, masks, 1.0, 1.0)
    assert wrong["ce"] > 10 and wrong["dice"] > 0.5


def test_params_that_cannot_work_are_user_errors(tiny_cfg: config.Config) -> None:
    s = tiny_cfg.segmenter
    with pytest.raises(UserError, match=r"segmenter.batch_size: 8 does not divide by the world size 3"):
        check_params(s, 4, 3)
    with pytest.raises(UserError, match=r"segmenter.class_weights: 2 weights for the 4 classes"):
        check_params(dataclasses.replace(s, class_weights=(1.0, 2.0)), 4, 1)
    check_params(s, 4, 2)


@pytest.mark.slow
def test_overfits_a_few_mosaics(tiny_params, tiny_shards: Path) -> None:
    """A real learning test: four train mosaics memorised to mIoU > 0.95 (model in eval mode)."""
    steps = 300
    overrides = {"segmenter.channels": 16, "segmenter.depth": 3, "segmenter.lr": 5e-3, "segmenter.warmup_steps": 10}
    cfg = config.load(tiny_params(overrides))
    num_classes = len(load_manifest(tiny_shards)["classes"])
    images, masks = next(eval_batches(tiny_shards, "mosaics", "train", 4, rank=0, world_size=1))
    with distributed(cfg.train) as env:
        model, optimizer = build_model(cfg.segmenter, num_classes, env, cfg.seed, channels_last=True)
        train_step = SegmenterStep(cfg.segmenter, model, optimizer, env, steps, channels_last=True)
        first = train_step(0, images, masks)["train_loss"]
        for step in range(1, steps):
            last = train_step(step, images, masks)["train_loss"]
    model.eval()
    with torch.no_grad():
        pred = model.logits(images).argmax(1)  # the view it memorised (no augmentation here)
    matrix = ConfusionMatrix(num_classes)
    matrix.update(pred, masks)
    result = matrix.compute()
    assert last < 0.2 * first
    assert result["miou"] > 0.95, result


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["unet", "fcn", "deeplabv3", "segformer", "renet"])
def test_one_and_two_processes_follow_the_same_loss_trajectory(
    arch: str, tiny_params, tiny_shards: Path, tmp_path: Path
) -> None:
    """Same global batches: 1 process vs 2 gloo processes (SyncBatchNorm + DDP) give the same losses and weights,
    for every segmenter family."""
    # SyncBN makes the step the same computation at any world size; fp32 keeps the comparison exact.
    params = tiny_params({"segmenter.arch": arch, "segmenter.sync_bn": True, "train.precision": "fp32"})
    steps = 6
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    outs = {n: tmp_path / f"world{n}" for n in (1, 2)}
    for out in outs.values():
        out.mkdir()
    args = [str(params), str(tiny_shards)]
    single = subprocess.Popen([sys.executable, str(WORLD_SCRIPT), *args, str(outs[1]), str(steps)], env=env)
    launch = [sys.executable, "-m", "pipeline.launch", "--nproc", "2", str(WORLD_SCRIPT)]
    double = subprocess.run([*launch, *args, str(outs[2]), str(steps)], env=env, timeout=TIMEOUT)
    assert single.wait(timeout=TIMEOUT) == 0 and double.returncode == 0
    one, two = (json.loads((outs[n] / "losses.json").read_text()) for n in (1, 2))
    assert len(one) == len(two) == steps
    # The first step is the same computation on the same weights: equal up to float32 round-off.
    for term in ("train_loss", "train_ce", "train_dice", "train_grad_norm"):
        assert one[0][term] == pytest.approx(two[0][term], rel=1e-5), (term, one[0], two[0])
    # Adam then amplifies that round-off (g / sqrt(v) of near-zero gradients): measured 2e-7 -> 5e-3 in the
    # loss over 6 steps for fcn, under 1e-4 for the U-Net.
    for a, b in zip(one, two, strict=True):
        for term in ("train_loss", "train_ce", "train_dice"):
            assert a[term] == pytest.approx(b[term], abs=1e-4 if arch == "unet" else 2e-2), (term, one, two)
    assert arch != "unet" or one[-1]["train_loss"] < one[0]["train_loss"]  # the others: tests/test_segmenter_models.py
    # 21 test mosaics over 2 ranks (11 + 10): each counted once, the same matrix as one process on the same weights.
    matrices = json.loads((outs[2] / "confusion.json").read_text())
    assert matrices["distributed"] == matrices["single"]
    assert sum(map(sum, matrices["distributed"])) == 21 * 32 * 32
    w1, w2 = (torch.load(outs[n] / "model.pt", weights_only=True) for n in (1, 2))
    assert w1.keys() == w2.keys()
    for key in w1 if arch == "unet" else ():  # the others' weights carry the amplified round-off above
        torch.testing.assert_close(w2[key], w1[key], atol=1e-4, rtol=1e-3, msg=key)


def _stage_cmd(params: Path, shards: Path, work: Path, nproc: int | None) -> list[str]:
    launcher = [sys.executable] if nproc is None else [sys.executable, "-m", "pipeline.launch", "--nproc", str(nproc)]
    args = ["--params", str(params), "--shards", str(shards)]
    args += ["--out", str(work / "models"), "--checkpoints", str(work / "checkpoints")]
    return [*launcher, str(STAGE), *args]


def _run_stage(params: Path, shards: Path, work: Path, db: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    proc = subprocess.run(
        _stage_cmd(params, shards, work, nproc), capture_output=True, text=True, env=env, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _stop_after_first_checkpoint(params: Path, shards: Path, work: Path, db: Path, nproc: int | None) -> int:
    """Start the stage in its own process group and SIGTERM the group once the first checkpoint exists.

    Like a scheduler or Ctrl-C, the signal reaches every process of the group, DataLoader workers included.
    """
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    cmd = _stage_cmd(params, shards, work, nproc)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    last = work / "checkpoints" / checkpoint.LAST
    deadline = time.monotonic() + TIMEOUT
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert "stopped at step" in stderr, stderr[-3000:]
    return proc.returncode


def _runs(db: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("texture-pipeline")
    return client.search_runs([experiment.experiment_id])


def _history(work: Path) -> list[dict[str, str]]:
    with open(work / "models" / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_stage_outputs_mlflow_run_and_exact_resume_after_sigterm(
    tiny_params, tiny_shards: Path, tmp_path: Path
) -> None:
    """2 gloo processes: a straight run vs one stopped by SIGTERM and restarted give the same weights and metrics."""
    params = tiny_params(RESUMABLE)
    total = 12
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    _run_stage(params, tiny_shards, straight, tmp_path / "straight.db")
    models = straight / "models"
    assert sorted(p.name for p in models.iterdir()) == ["history.csv", "model.pt", "run.json"]
    model, meta = load_segmenter(models / "model.pt")
    assert isinstance(model, UNet) and meta["classes"] == ["stripes", "checker", "dots", "brick"]
    run_record = json.loads((models / "run.json").read_text())
    (run,) = _runs(tmp_path / "straight.db")
    assert run.info.run_id == run_record["run_id"] == meta["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["segmenter.batch_size"] == "8" and run.data.params["train.nproc_per_node"] == "2"
    assert run.data.tags["world_size"] == "2" and run.data.tags["data.manifest_sha256"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'straight.db'}")
    val = client.get_metric_history(run.info.run_id, "val_miou")
    assert [m.step for m in val] == [4, 8, 12]
    assert meta["val_miou"] == pytest.approx(max(m.value for m in val))
    assert run.data.metrics["best_val_miou"] == pytest.approx(meta["val_miou"])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == total  # log_every = 1
    rows = _history(straight)
    assert [r["step"] for r in rows if r["val_miou"]] == ["4", "8", "12"]

    # Stopped part-way (torchrun forwards SIGTERM; each worker saves and exits 143), then restarted.
    _stop_after_first_checkpoint(params, tiny_shards, resumed, tmp_path / "resumed.db", nproc=2)
    stopped = checkpoint.load(resumed / "checkpoints" / checkpoint.LAST)
    assert 2 <= stopped["step"] < total
    (killed,) = _runs(tmp_path / "resumed.db")
    assert killed.info.status == "KILLED"
    _run_stage(params, tiny_shards, resumed, tmp_path / "resumed.db")
    (finished,) = _runs(tmp_path / "resumed.db")  # the same MLflow run, resumed
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"

    a = checkpoint.load(straight / "checkpoints" / checkpoint.LAST)
    b = checkpoint.load(resumed / "checkpoints" / checkpoint.LAST)
    assert a["step"] == b["step"] == total
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=1e-6, msg=key)
    assert a["best"]["epoch"] == b["best"]["epoch"] and a["best"]["val_miou"] == b["best"]["val_miou"]
    rows_b = _history(resumed)
    for column in ("train_loss", "val_miou"):
        assert [r[column] for r in rows] == [r[column] for r in rows_b], column


@pytest.mark.slow
def test_sigterm_exits_143_with_a_loadable_checkpoint(tiny_params, tiny_shards: Path, tmp_path: Path) -> None:
    """One plain process with a DataLoader worker: the stop signal must not kill the worker and fail the run."""
    params = tiny_params(RESUMABLE | {"train.nproc_per_node": 1, "train.num_workers": 1})
    code = _stop_after_first_checkpoint(params, tiny_shards, tmp_path, tmp_path / "mlflow.db", nproc=None)
    assert code == EXIT_STOPPED
    state = checkpoint.load(tmp_path / "checkpoints" / checkpoint.LAST)
    assert 2 <= state["step"] < 12 and state["run_id"]
    UNet(num_classes=4, channels=8, depth=2, decoder=config.load(params).segmenter.decoder).load_state_dict(
        state["model"]
    )
    assert not (tmp_path / "models" / "model.pt").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_error(tiny_params, tiny_shards: Path, tmp_path: Path) -> None:
    cfg = config.load(tiny_params({"segmenter.lr": 1e30, "segmenter.warmup_steps": 0, "train.nproc_per_node": 1}))
    with pytest.raises(NonFiniteLossError, match=r"step \d+: \w+ is (nan|inf|-inf); training stopped"):
        train_segmenter(cfg, tiny_shards, tmp_path / "out", tmp_path / "ckpt")
    (run,) = _runs(tmp_path / "mlflow.db")
    assert run.info.status == "FAILED"
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["fcn", "deeplabv3", "segformer", "renet"])
def test_every_family_trains_through_the_stage_and_loads_as_itself(
    arch: str, tiny_params, tiny_shards: Path, tmp_path: Path
) -> None:
    """One process, one epoch: the stage saves the family's best model; the one loader gives it back, tagged."""
    overrides = {"segmenter.arch": arch, "segmenter.epochs": 1, "train.nproc_per_node": 1}
    _run_stage(tiny_params(overrides), tiny_shards, tmp_path, tmp_path / "mlflow.db", nproc=1)
    model, meta = load_segmenter(tmp_path / "models" / "model.pt")
    assert model.arch == arch and meta["classes"] == ["stripes", "checker", "dots", "brick"]
    (run,) = _runs(tmp_path / "mlflow.db")
    assert run.data.tags["model.arch"] == arch and run.data.params["segmenter.arch"] == arch
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4, 32, 32)
