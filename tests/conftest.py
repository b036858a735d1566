"""Shared fixtures: tiny params and a tiny sharded dataset built once per test session."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import config

ROOT = Path(__file__).resolve().parents[1]

# Small enough for seconds-long tests on 2 CPU cores, large enough for every split to have shards.
TINY: dict[str, Any] = {
    "data.classes": ["stripes", "checker", "dots", "brick"],
    "data.instances_per_class": 6,
    "data.source_size": 64,
    "data.patch_size": 16,
    "data.patches_per_source": 8,
    "data.mosaic_size": 32,
    "data.max_regions": 3,
    "data.mosaics": {"train": 48, "val": 20, "test": 21},
    "data.shard_max_samples": 8,
    "data.min_shards": 2,
    "train.nproc_per_node": 2,
    "train.num_workers": 0,
    "train.max_restarts": 0,
    "gan.z_dim": 16,
    "gan.channels": 16,
    "gan.batch_size": 8,
    "gan.steps": 4,
    "gan.log_every": 2,
    "gan.checkpoint_every": 2,
    "gan.eval_every": 2,
    "gan.eval_samples": 16,
    "gan.sample_every": 4,
    "segmenter.channels": 8,
    "segmenter.depth": 2,
    "segmenter.batch_size": 8,
    "segmenter.epochs": 2,
    "segmenter.steps_per_epoch": 2,
    "segmenter.warmup_steps": 1,
    "segmenter.log_every": 1,
    "segmenter.checkpoint_every": 2,
    "evaluate.feature_dim": 16,
    "evaluate.feature_steps": 4,
    "evaluate.feature_batch_size": 16,
    "evaluate.samples_per_class": 5,
    "evaluate.batch_size": 16,
    "evaluate.knn_k": 2,
    "register.segmenter.min_miou": 0.5,  # the registry tests' gate, independent of the CPU defaults'
}


# The whole suite runs with one train.precision when asked (``TEST_PRECISION=fp32 make test``, or ``bf16`` on a
# CPU that computes it): tests that pin a precision for exact comparisons keep theirs.
FORCED = {"train.precision": os.environ["TEST_PRECISION"]} if os.environ.get("TEST_PRECISION") else {}


def write_params(directory: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write the repo's params.yaml with TINY and ``overrides`` applied into ``directory``."""
    raw = config.load_raw(ROOT / "params.yaml")
    for key, value in (TINY | FORCED | (overrides or {})).items():
        config.set_dotted(raw, key, value)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def tiny_params(tmp_path: Path) -> Callable[..., Path]:
    """``tiny_params(**{"gan.loss": "hinge"})`` -> path of a tiny params.yaml in tmp_path."""

    def make(overrides: dict[str, Any] | None = None, directory: Path | None = None) -> Path:
        return write_params(directory or tmp_path, overrides)

    return make


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> config.Config:
    return config.load(write_params(tmp_path))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset written once: ``<dir>/manifest.json``, ``<dir>/patches/*.tar``, ``<dir>/mosaics/*.tar``."""
    from pipeline.data.prepare import prepare_dataset

    base = tmp_path_factory.mktemp("tiny")
    cfg = config.load(write_params(base))
    out = base / "shards"
    prepare_dataset(cfg, out, progress=False)
    return out


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never log into the repo's mlflow.db from a test: each test gets its own sqlite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if "mlflow" in sys.modules:  # the client caches the URI in-process too
        sys.modules["mlflow"].set_tracking_uri(uri)
