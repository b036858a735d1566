"""Both shard encodings end to end: prepare, verify-shards, every training stage a few steps, evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline import config
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import load_manifest, verify_shards
from pipeline.distributed import DistEnv
from pipeline.evaluation.generator import evaluate_gan
from pipeline.evaluation.segmenter import evaluate_segmenter
from pipeline.training.features import train_feature_extractor
from pipeline.training.gan import train_gan
from pipeline.training.segmenter import train_segmenter
from tests.conftest import write_params

CPU = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", None)


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_encoding_prepares_trains_and_evaluates(encoding: str, tmp_path: Path) -> None:
    short = {"evaluate.feature_steps": 2, "gan.steps": 2, "gan.eval_every": 2, "segmenter.epochs": 1}
    cfg = config.load(write_params(tmp_path, {"data.encoding": encoding} | short))
    shards = tmp_path / "shards"
    prepare_dataset(cfg, shards, progress=False)
    assert load_manifest(shards)["encoding"] == encoding and verify_shards(shards) == []
    features = tmp_path / "features"
    train_feature_extractor(cfg, shards, features, tmp_path / "ckpt" / "features", progress=False)
    train_gan(cfg, shards, features / "extractor.pt", tmp_path / "gan", tmp_path / "ckpt" / "gan")
    train_segmenter(cfg, shards, tmp_path / "segmenter", tmp_path / "ckpt" / "segmenter")
    gan = evaluate_gan(cfg, CPU, shards, tmp_path / "gan" / "generator.pt", features / "extractor.pt")["metrics"]
    seg = evaluate_segmenter(cfg, CPU, shards, tmp_path / "segmenter" / "model.pt")["metrics"]
    assert math.isfinite(gan["fid"]) and gan["num_samples"] == 4 * cfg.evaluate.samples_per_class
    assert 0.0 <= seg["miou"] <= 1.0 and seg["num_images"] == cfg.data.mosaics.test
