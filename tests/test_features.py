"""Texture feature network, extractor files, and the train_fid_features stage on the tiny dataset."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import config
from pipeline.errors import UserError
from pipeline.models.features import (
    TextureFeatureNet,
    inception_extractor,
    load_feature_extractor,
    save_feature_extractor,
)
from pipeline.tracking import file_sha256
from pipeline.training.features import train_feature_extractor
from tests.conftest import ROOT, write_params


@pytest.mark.parametrize("shape", [(16, 16), (32, 32), (24, 40)])
def test_features_and_logits_shapes(shape: tuple[int, int]) -> None:
    net = TextureFeatureNet(num_classes=5, dim=12).eval()
    images = torch.rand(3, 3, *shape)
    assert net.features(images).shape == (3, 12)
    assert net(images).shape == (3, 5)


def test_features_reject_tiny_or_non_rgb_images() -> None:
    net = TextureFeatureNet(num_classes=2, dim=4)
    with pytest.raises(ValueError, match="at least 16x16"):
        net.features(torch.rand(1, 3, 8, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net.features(torch.rand(1, 1, 32, 32))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TextureFeatureNet(num_classes=3, dim=8)
    net.train()
    net(torch.rand(8, 3, 16, 16))  # move BatchNorm running statistics off their defaults
    net.eval()
    path = tmp_path / "extractor.pt"
    save_feature_extractor(path, net, {"classes": ["a", "b", "c"], "test_accuracy": 0.5})
    extractor, meta = load_feature_extractor(path)
    assert meta == {"classes": ["a", "b", "c"], "test_accuracy": 0.5, "sha256": file_sha256(path)}
    images = torch.rand(4, 3, 16, 16)
    assert torch.equal(extractor(images), net.features(images).detach())
    extractor.train()  # must stay in eval mode: BatchNorm keeps its running statistics
    assert torch.equal(extractor(images), net.features(images).detach())
    assert not any(p.requires_grad for p in extractor.parameters())


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.pt: feature extractor not found"):
        load_feature_extractor(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"corrupt\.pt: cannot load"):
        load_feature_extractor(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UserError, match=r"other\.pt: not a feature extractor"):
        load_feature_extractor(other)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"pip install \.\[inception\].*weights"):
        inception_extractor("cpu")


def test_train_feature_extractor_writes_loadable_files(tmp_path: Path, tiny_shards: Path) -> None:
    cfg = config.load(write_params(tmp_path, {"evaluate.feature_steps": 3}))
    summary = train_feature_extractor(cfg, tiny_shards, tmp_path / "out", tmp_path / "ckpt", progress=False)
    on_disk = json.loads((tmp_path / "out" / "extractor.json").read_text())
    assert on_disk == summary
    assert summary["classes"] == ["stripes", "checker", "dots", "brick"]
    assert summary["steps"] == 3 and summary["test_samples"] > 0
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    extractor, meta = load_feature_extractor(tmp_path / "out" / "extractor.pt")
    assert meta["sha256"] == summary["sha256"] == file_sha256(tmp_path / "out" / "extractor.pt")
    assert meta["test_accuracy"] == summary["test_accuracy"]
    assert extractor(torch.rand(2, 3, 16, 16)).shape == (2, cfg.evaluate.feature_dim)
    # same params and seed -> the same weights, byte for byte
    again = train_feature_extractor(cfg, tiny_shards, tmp_path / "again", tmp_path / "ckpt2", progress=False)
    assert again["sha256"] == summary["sha256"]


@pytest.mark.slow
def test_stage_script_in_a_work_dir(tmp_path: Path, tiny_shards: Path) -> None:
    write_params(tmp_path)
    stage = [sys.executable, str(ROOT / "stages" / "train_fid_features.py"), "--shards", str(tiny_shards)]
    done = subprocess.run(stage, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout
    summary = json.loads((tmp_path / "models" / "features" / "extractor.json").read_text())
    _, meta = load_feature_extractor(tmp_path / "models" / "features" / "extractor.pt")
    assert meta["sha256"] == summary["sha256"]
    assert summary["steps"] == 4  # TINY's evaluate.feature_steps, read from ./params.yaml

    bad = subprocess.run([*stage, "--params", "nope.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "nope.yaml" in bad.stderr and "Traceback" not in bad.stderr
