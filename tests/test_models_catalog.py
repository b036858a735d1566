"""``python -m pipeline models``: every segmenter and generator family, the param that selects it, its size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline import config
from pipeline.models.catalog import describe_models, num_classes
from pipeline.models.gan import GENERATORS, discriminator_from_config, encoder_from_config, generator_from_config
from tests.conftest import ROOT, write_params


def _count(model: object) -> int:
    return sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]


def test_every_generator_family_is_listed_with_its_models(tmp_path: Path) -> None:
    cfg = config.load(write_params(tmp_path, {"gan.arch": "vae", "gan.vae.adversarial": 0.5}))
    rows = [r for r in describe_models(cfg) if r["kind"] != "segmenter"]
    classes, size = num_classes(cfg.data), cfg.data.patch_size
    expected = []
    for arch in GENERATORS:
        built = {
            "generator": generator_from_config(cfg.gan, classes, size, arch),
            "discriminator": discriminator_from_config(cfg.gan, classes, size, arch),
            "encoder": encoder_from_config(cfg.gan, classes, size, arch),
        }
        expected += [(kind, arch, f"gan.arch={arch}", arch == "vae", _count(m)) for kind, m in built.items() if m]
    assert [(r["kind"], r["family"], r["selected_by"], r["in_use"], r["parameters"]) for r in rows] == expected
    assert {r["kind"] for r in rows if r["family"] == "vae"} == {"generator", "discriminator", "encoder"}
    plain = config.load(write_params(tmp_path, {"gan.arch": "resnet"}))
    vae_kinds = {r["kind"] for r in describe_models(plain) if r["family"] == "vae"}
    assert vae_kinds == {"generator", "encoder"}  # no discriminator without the VAE-GAN term


def test_models_command_prints_the_table(tmp_path: Path) -> None:
    params = write_params(tmp_path, {"gan.arch": "resnet", "gan.attention": 8})
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "models", "--params", str(params)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split() == ["kind", "family", "selected_by", "in_use", "parameters"]
    resnet = [line.split() for line in lines if "gan.arch=resnet" in line]
    assert [r[0] for r in resnet] == ["generator", "discriminator"] and all(r[3] == "*" for r in resnet)
    assert any("segmenter.arch=segformer" in line for line in lines)
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline", "models", "--params", str(write_params(tmp_path, {"gan.arch": "gan"}))],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"python -m pipeline: error: {params}: gan.arch: expected one of 'dcgan', 'resnet', 'vae', got 'gan'"
    ]
