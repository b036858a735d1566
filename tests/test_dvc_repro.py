"""The whole pipeline under a real `dvc repro` on tiny params, in a scratch git + DVC repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_params

STAGES = ["prepare", "train_fid_features", "train_gan", "train_segmenter", "evaluate", "register"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / ".gitignore", repo)
    gates = {"register.gan.max_fid_ratio": 1e9, "register.gan.min_diversity": 0.0, "register.gan.min_recall": 0.0}
    write_params(repo, gates | {"register.segmenter.min_miou": 0.0})
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(repo),  # the stages import this copy of the library
    }
    _run(["git", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo, env)

    first = _run([sys.executable, "-m", "dvc", "repro"], repo, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, first.stdout[-3000:]

    gan = json.loads((repo / "metrics/gan.json").read_text())
    seg = json.loads((repo / "metrics/segmenter.json").read_text())
    assert {"fid", "kid_mean", "kid_std", "recall", "precision", "coverage", "diversity", "baselines"} <= gan.keys()
    assert {"miou", "pixel_accuracy", "iou", "num_images"} <= seg.keys()
    for path in ("models/gan/generator.pt", "models/segmenter/model.pt", "plots/gan_samples.png"):
        assert (repo / path).is_file(), path

    second = _run([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert "Running stage" not in second.stdout, second.stdout
    status = _run([sys.executable, "-m", "dvc", "status"], repo, env)
    assert "up to date" in status.stdout

    shown = _run([sys.executable, "-m", "dvc", "metrics", "show"], repo, env)
    assert "metrics/gan.json" in shown.stdout and "metrics/segmenter.json" in shown.stdout

    check = (
        "import mlflow; c = mlflow.MlflowClient();"
        "seg = c.get_model_version_by_alias('texture-segmenter', 'champion');"
        "gan = c.get_model_version_by_alias('texture-gan', 'champion');"
        "run = c.get_run(seg.run_id);"
        "print(sorted(run.data.params)[:1], 'test_miou' in run.data.metrics, c.get_run(gan.run_id).info.run_name)"
    )
    out = _run([sys.executable, "-c", check], repo, env).stdout
    assert "True" in out and "train_gan" in out, out
