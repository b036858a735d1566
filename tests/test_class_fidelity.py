"""Class fidelity: the FID extractor's classifier reads the class of generated samples; a conditional generator
that draws one class for every label scores about 1 / classes and never becomes champion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from pipeline import config, registry
from pipeline.data.loaders import eval_batches
from pipeline.data.shards import load_manifest
from pipeline.distributed import DistEnv
from pipeline.evaluation import generator as ev_gen
from pipeline.models.features import FeatureExtractor, TextureFeatureNet
from pipeline.models.gan import Generator
from tests.conftest import write_params

pytest.register_assert_rewrite("tests.mlflow_server")  # imported here before pytest_plugins loads it
from tests.mlflow_server import FakeTraining, MlflowServer  # noqa: E402

pytest_plugins = ["tests.mlflow_server"]

SINGLE = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", None)


def _patches(shard_dir: Path, split: str) -> tuple[Tensor, Tensor]:
    batches = list(eval_batches(shard_dir, "patches", split, 64, rank=0, world_size=1))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.fixture(scope="module")
def trained_extractor(tiny_shards: Path) -> FeatureExtractor:
    """A texture classifier fitted to the tiny train patches (a few seconds): what train_fid_features makes."""
    images, labels = _patches(tiny_shards, "train")
    torch.manual_seed(0)
    net = TextureFeatureNet(len(load_manifest(tiny_shards)["classes"]), 16)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(150):
        rows = torch.randint(0, len(labels), (32,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(net(images[rows]), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return FeatureExtractor(net)


class ReplayGenerator(Generator):
    """Real patches of the class it is asked for (``one_class``: always of that class, whatever the label)."""

    def __init__(self, patches: list[Tensor], one_class: int | None = None) -> None:
        super().__init__(num_classes=len(patches), z_dim=4, channels=8, image_size=patches[0].shape[-1])
        self.patches, self.one_class, self.drawn = patches, one_class, 0

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        out = []
        for c in labels.tolist():
            pool = self.patches[c if self.one_class is None else self.one_class]
            out.append(pool[self.drawn % len(pool)])
            self.drawn += 1
        return torch.stack(out) * 2 - 1


def _fidelity(generator: Generator, extractor: FeatureExtractor, classes: list[str]) -> dict:
    z, labels = ev_gen.class_samples(len(classes), 8, generator.z_dim, 0, 16)
    feats = ev_gen.generated_features(generator, extractor, z, labels, 16, SINGLE)
    return ev_gen.class_fidelity(extractor, feats, labels, classes)


def test_class_fidelity_reads_the_requested_class(tiny_shards: Path, trained_extractor: FeatureExtractor) -> None:
    classes = list(load_manifest(tiny_shards)["classes"])
    images, labels = _patches(tiny_shards, "train")  # the patches the classifier fits: its reading is reliable
    patches = [images[labels == c] for c in range(len(classes))]
    logits = trained_extractor.classify(trained_extractor(images))
    assert logits.shape == (len(labels), len(classes))
    torch.testing.assert_close(logits, trained_extractor.net(images))  # the net's own class logits
    faithful = _fidelity(ReplayGenerator(patches), trained_extractor, classes)
    assert faithful["class_fidelity"] >= 0.6, faithful  # chance: 0.25
    assert faithful["class_fidelity"] == pytest.approx(sum(faithful["class_fidelity_per_class"].values()) / 4)
    ignoring = _fidelity(ReplayGenerator(patches, one_class=1), trained_extractor, classes)
    per_class = ignoring["class_fidelity_per_class"]
    # Every label gets checker patches: each class's share is how often checker is read as that class, so the
    # shares add up to about 1 and their mean to about 1 / classes, however good the classifier.
    assert list(per_class) == classes and sum(per_class.values()) == pytest.approx(1.0, abs=0.2)
    assert ignoring["class_fidelity"] == pytest.approx(1 / len(classes), abs=0.05)


def test_a_class_ignoring_generator_never_becomes_champion(
    tiny_shards: Path,
    trained_extractor: FeatureExtractor,
    tmp_path: Path,
    tracking_server: MlflowServer,
    fake_training: FakeTraining,
) -> None:
    cfg = config.load(write_params(tmp_path, {"register.gan.min_class_fidelity": 0.5}))  # 4 classes: chance 0.25
    classes = list(load_manifest(tiny_shards)["classes"])
    images, labels = _patches(tiny_shards, "train")
    patches = [images[labels == c] for c in range(len(classes))]
    headline = {"fid": 30.0, "fid_ratio": 0.1, "recall": 0.5, "diversity": 0.9, "fid_features": "a" * 64}
    one_class = headline | _fidelity(ReplayGenerator(patches, one_class=1), trained_extractor, classes)
    record = registry.register_model(cfg, "gan", fake_training("gan", 0), one_class)
    assert record["aliases"] == ["challenger"] and "< min_class_fidelity 0.5" in record["reason"]
    faithful = headline | _fidelity(ReplayGenerator(patches), trained_extractor, classes)
    assert registry.register_model(cfg, "gan", fake_training("gan", 1), faithful)["aliases"] == ["champion"]
