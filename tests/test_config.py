"""params.yaml validation: every user mistake names its key; the stage CLIs print one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from tests.conftest import ROOT


def test_repo_params_load() -> None:
    cfg = config.load(ROOT / "params.yaml")
    assert cfg.gan.lr_g == 2e-4 and (cfg.gan.beta1, cfg.gan.beta2) == (0.5, 0.999)
    assert cfg.mlflow.experiment == "texture-pipeline"
    assert cfg.data.patch_size % 8 == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"data.patch_size": 30}, "params.yaml: data.patch_size: expected a positive multiple of 8, got 30"),
        ({"gan.los": "ns"}, "params.yaml: gan.los: unknown key"),
        ({"gan.loss": "wgan"}, "params.yaml: gan.loss: expected one of 'ns', 'hinge', 'ls', 'wgan-gp', got 'wgan'"),
        ({"gan.steps": "10"}, "params.yaml: gan.steps: expected int, got '10'"),
        ({"gan.steps": True}, "params.yaml: gan.steps: expected int, got True"),
        ({"gan.lr_g": -1.0}, "params.yaml: gan.lr_g: expected a positive number, got -1.0"),
        ({"gan.fourier": -2}, "params.yaml: gan.fourier: expected a whole number >= 0, got -2"),
        ({"train.nproc_per_node": "many"}, "params.yaml: train.nproc_per_node: expected int or one of 'auto'"),
        ({"train.nproc_per_node": 0}, "params.yaml: train.nproc_per_node: expected 'auto' or a positive integer"),
        ({"gan.diffaug": ["color", "zoom"]}, "params.yaml: gan.diffaug[1]: expected one of"),
        ({"data.mosaics": {"train": 3, "val": 1}}, "params.yaml: data.mosaics.test: missing key"),
        ({"data": []}, "params.yaml: data: expected a mapping"),
        ({"data.source": "folder", "data.folder": ""}, "params.yaml: data.folder: required when data.source"),
        ({"data.min_shards": 1, "train.nproc_per_node": 4}, "params.yaml: data.min_shards: expected >= "),
        ({"segmenter.scale_augment": 0.6}, "params.yaml: segmenter.scale_augment: expected a number in [0, 0.5]"),
        ({"segmenter.decoder": "sum"}, "params.yaml: segmenter.decoder: expected one of 'concat', 'add', got 'sum'"),
        (
            {"data.augment.rot90": False},
            "params.yaml: segmenter.tta: 'd8' averages views the model learns only with data.augment.rot90: true "
            "(or set segmenter.tta: none)",
        ),
        ({"data.augment.flip": False, "segmenter.tta": "flip"}, "params.yaml: segmenter.tta: 'flip' averages views"),
    ],
)
def test_bad_values_name_the_key(override: dict, message: str, tmp_path: Path) -> None:
    raw = config.load_raw(ROOT / "params.yaml")
    for key, value in override.items():
        config.set_dotted(raw, key, value)
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"missing\.yaml: cannot read params file"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(config.ConfigError, match=r"bad.yaml: invalid YAML at line"):
        config.load(bad)


def test_config_is_frozen_and_hashable_by_section(tiny_cfg: config.Config) -> None:
    with pytest.raises(AttributeError):
        tiny_cfg.gan.steps = 3  # type: ignore[misc]
    other = config.load(ROOT / "params.yaml")
    assert tiny_cfg.section_hash("mlflow") == other.section_hash("mlflow")
    assert tiny_cfg.section_hash("gan") != other.section_hash("gan")
    flat = config.flatten(tiny_cfg.data, "data.")
    assert flat["data.mosaics.train"] == 48 and flat["data.augment.flip"] is True


def test_overrides_round_trip(tmp_path: Path) -> None:
    cfg = config.load(ROOT / "params.yaml", {"gan.loss": "hinge", "gan.diffaug": ["color"]})
    assert cfg.gan.loss == "hinge" and cfg.gan.diffaug == ("color",)
    assert config.parse(config.to_dict(cfg)) == cfg


def test_cli_user_error_is_one_line(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("patch_size: 32", "patch_size: 30"))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "promote", "texture-gan", "--params", str(params)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"python -m pipeline: error: {params}: data.patch_size: expected a positive multiple of 8, got 30"
    )
