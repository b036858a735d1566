"""The whole pipeline under a real `dvc repro` on tiny params, in a scratch git + DVC repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TINY, write_params

STAGES = ["prepare", "train_fid_features", "train_gan", "train_segmenter", "evaluate", "register"]
HEADLINE = "fid$|fid_ratio|recall$|diversity$|miou$|pixel_accuracy$"  # README's `dvc exp show --keep`


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _dvc(repo: Path, env: dict[str, str], *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], repo, env).stdout


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """A scratch git + DVC repo with this checkout's pipeline on tiny params after one ``dvc repro``:
    (repo, env, the repro's stdout)."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / ".gitignore", repo)
    gates = {"register.gan.max_fid_ratio": 1e9, "register.gan.min_diversity": 0.0, "register.gan.min_recall": 0.0}
    gates |= {"register.gan.min_class_fidelity": 0.0}
    write_params(repo, gates | {"register.segmenter.min_miou": 0.0})
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(repo),  # the stages import this copy of the library
    }
    _run(["git", "init", "-q"], repo, env)
    for key, value in (("user.name", "test"), ("user.email", "test@example.com")):  # dvc exp commits
        _run(["git", "config", key, value], repo, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo, env)
    return repo, env, _dvc(repo, env, "repro")


@pytest.mark.slow
def test_dvc_repro_end_to_end(pipeline_repo: tuple[Path, dict[str, str], str]) -> None:
    repo, env, first = pipeline_repo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first, first[-3000:]

    gan = json.loads((repo / "metrics/gan.json").read_text())
    seg = json.loads((repo / "metrics/segmenter.json").read_text())
    assert {"fid", "kid_mean", "kid_std", "recall", "precision", "coverage", "diversity", "baselines"} <= gan.keys()
    assert {"miou", "pixel_accuracy", "num_images"} <= seg.keys()
    for path in ("models/gan/generator.pt", "models/segmenter/model.pt", "plots/gan_samples.png", "plots/iou.csv"):
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
        "print(sorted(run.data.params)[:1], 'test_miou' in run.data.metrics, c.get_run(gan.run_id).info.run_name);"
        "print(len(gan.tags), len(seg.tags), sorted({'fid', 'fid_ratio', 'recall', 'diversity'} - set(gan.tags)))"
    )
    out = _run([sys.executable, "-c", check], repo, env).stdout.splitlines()
    assert "True" in out[0] and "train_gan" in out[0], out
    gan_tags, seg_tags, missing = out[1].split(" ", 2)
    assert int(gan_tags) <= 12 and int(seg_tags) <= 12 and missing == "[]", out  # lean version tags


def _flat(data: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted leaf keys, as `dvc exp show` names its metric columns."""
    keys: set[str] = set()
    for key, value in data.items():
        keys |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return keys


def _metric_columns(row: dict[str, Any]) -> dict[str, set[str]]:
    """An `exp show --json` row's metric columns per metrics file."""
    return {path: _flat(entry["data"]) for path, entry in (row["data"]["metrics"] or {}).items()}


@pytest.mark.slow
def test_experiments_compare_in_a_terminal(pipeline_repo: tuple[Path, dict[str, str], str]) -> None:
    """README's round trip on two experiments (the committed baseline and one `dvc exp run -S`): `dvc exp show`
    within 30 metric columns, its usual view, `dvc metrics diff` and `dvc plots diff` with the per-class bars."""
    repo, env, _ = pipeline_repo
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "baseline"], repo, env)
    _dvc(repo, env, "exp", "run", "-n", "tiny", "-S", "segmenter.steps_per_epoch=1")

    rows = json.loads(_dvc(repo, env, "exp", "show", "--json"))
    baseline = next(r for r in rows if r["rev"] != "workspace")
    (experiment,) = [r for exp in baseline["experiments"] for r in exp["revs"]]
    assert experiment["name"] == "tiny"
    columns: dict[str, set[str]] = {}
    for row in (baseline, experiment):
        for path, keys in _metric_columns(row).items():
            columns.setdefault(path, set()).update(keys)
    assert set(columns) == {"metrics/gan.json", "metrics/segmenter.json"}
    assert sum(len(keys) for keys in columns.values()) <= 30, columns
    assert {"fid", "fid_ratio", "recall", "diversity", "baselines.fid_real"} <= columns["metrics/gan.json"]
    assert {"miou", "pixel_accuracy"} <= columns["metrics/segmenter.json"]
    classes = set(TINY["data.classes"])
    assert not {k for keys in columns.values() for k in keys if k.rsplit(".", 1)[-1] in classes}  # no per-class

    # The usual view: the headline metrics and what changed (the param, the model, metrics that moved).
    usual = _dvc(repo, env, "exp", "show", "--csv", "--only-changed", "--keep", HEADLINE).splitlines()[0].split(",")
    headline = {"fid", "fid_ratio", "recall", "diversity", "miou", "pixel_accuracy"}
    assert headline | {"segmenter.steps_per_epoch"} <= set(usual), usual
    assert not [c for c in usual if c.startswith(("seed", "data.", "train.", "gan.", "evaluate."))], usual
    assert len(usual) <= 20, usual

    diff = json.loads(_dvc(repo, env, "metrics", "diff", "--all", "--json", "HEAD", "tiny"))
    assert {path: set(keys) for path, keys in diff.items()} == columns
    assert {"old", "new", "diff"} <= diff["metrics/segmenter.json"]["miou"].keys()

    plots = json.loads(_dvc(repo, env, "plots", "diff", "--json", "HEAD", "tiny"))["data"]
    for name in ("iou", "fid_per_class", "fid_per_class_real", "diversity_per_class"):
        (plot,) = plots[f"plots/{name}.csv"]
        assert plot["revisions"] == ["HEAD", "tiny"] and plot["content"]["mark"]["type"] == "bar", name
        bars = {(v["rev"], v["class"]) for v in plot["content"]["data"]["values"]}
        assert {rev for rev, _ in bars} == {"HEAD", "tiny"} and {c for _, c in bars} <= classes, name


@pytest.mark.slow
def test_a_queued_sweep_restores_the_unchanged_training_stages(pipeline_repo: tuple[Path, dict[str, str], str]) -> None:
    """README's sweep: a queued experiment runs in a temp workspace, where DVC restores the feature extractor and
    the GAN (no persistent outputs keeps them in the run-cache) and trains only the segmenter of the new family,
    logging to the one MLflow store that ``MLFLOW_TRACKING_URI`` names."""
    repo, env, _ = pipeline_repo
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "sweep baseline", "--allow-empty"], repo, env)
    _dvc(repo, env, "exp", "run", "--queue", "-n", "fcn", "-S", "segmenter.arch=fcn")
    _dvc(repo, env, "exp", "run", "--run-all")

    log = _dvc(repo, env, "queue", "logs", "fcn")
    assert "Running stage 'train_segmenter'" in log, log[-3000:]
    for stage in ("prepare", "train_fid_features", "train_gan"):
        assert f"Running stage '{stage}'" not in log, log[-3000:]
    rows = json.loads(_dvc(repo, env, "exp", "show", "--json"))
    revs = [r for row in rows for exp in row.get("experiments") or [] for r in exp["revs"]]
    (experiment,) = [r for r in revs if r["name"] == "fcn"]
    assert experiment["data"]["params"]["params.yaml"]["data"]["segmenter"]["arch"] == "fcn"
    assert 0.0 <= experiment["data"]["metrics"]["metrics/segmenter.json"]["data"]["miou"] <= 1.0
    check = (
        "import mlflow; c = mlflow.MlflowClient(); e = c.get_experiment_by_name('texture-pipeline');"
        "runs = c.search_runs([e.experiment_id]);"
        "print(sorted(r.data.tags.get('model.arch', '-') for r in runs if r.info.run_name == 'train_segmenter'))"
    )
    assert "'fcn'" in _run([sys.executable, "-c", check], repo, env).stdout
