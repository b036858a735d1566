"""``python -m pipeline fid DIR_A DIR_B``: real image folders, a real (untrained) extractor file, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import UserError
from pipeline.evaluation.generator import fid_between_folders
from pipeline.metrics.fid import GaussianStats, fid_from_stats, kid
from pipeline.models.features import TextureFeatureNet, load_feature_extractor, save_feature_extractor
from pipeline.tracking import file_sha256
from tests.conftest import ROOT


def _write_images(folder: Path, count: int, seed: int, size: int = 16, stripes: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        if stripes:
            image[:, ::2] //= 4
        Image.fromarray(image).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``a/`` (noise) and ``b/`` (striped noise) of 16x16 PNGs, plus ``extractor.pt`` (untrained net)."""
    base = tmp_path_factory.mktemp("fid")
    _write_images(base / "a", 12, seed=0)
    _write_images(base / "b", 9, seed=1, stripes=True)
    torch.manual_seed(0)
    save_feature_extractor(
        base / "extractor.pt", TextureFeatureNet(num_classes=2, dim=8).eval(), {"classes": ["x", "y"]}
    )
    return base


def _fid_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline", "fid", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_fid_between_folders_matches_direct_computation(folders: Path) -> None:
    result = fid_between_folders(
        folders / "a", folders / "b", features=str(folders / "extractor.pt"), batch_size=5, device="cpu"
    )
    extractor, _ = load_feature_extractor(folders / "extractor.pt")

    def features(folder: Path) -> torch.Tensor:
        images = [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]
        return extractor(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255).double()

    fa, fb = features(folders / "a"), features(folders / "b")
    sa, sb = GaussianStats(8), GaussianStats(8)
    sa.update(fa)
    sb.update(fb)
    # float32 features from batches of 5 and from one batch differ in the last bits (by CPU: 6e-8 relative in
    # the FID on an Intel Xeon, 0 on AMD EPYC): float32-sized tolerances
    assert result["fid"] == pytest.approx(fid_from_stats(sa, sb), rel=1e-5)
    assert (result["kid_mean"], result["kid_std"]) == pytest.approx(kid(fa, fb, 100, 1000, seed=0), rel=1e-5)
    assert result["num_a"] == 12 and result["num_b"] == 9
    assert result["features"] == file_sha256(folders / "extractor.pt")
    assert result["fid"] > 0


def test_cli_prints_fid_and_zero_for_the_same_folder(folders: Path) -> None:
    done = _fid_cli("a", "a", "--features", "extractor.pt", cwd=folders)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "FID: 0.0000"


def test_cli_json_has_every_statistic(folders: Path) -> None:
    done = _fid_cli("a", "b", "--features", "extractor.pt", "--json", "--batch-size", "4", cwd=folders)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"fid", "kid_mean", "kid_std", "num_a", "num_b", "features"}
    assert result["fid"] > 0 and result["kid_std"] >= 0
    assert result["num_a"] == 12 and result["num_b"] == 9
    assert result["features"] == file_sha256(folders / "extractor.pt")


@pytest.fixture(scope="module")
def bad_folders(folders: Path) -> Path:
    (folders / "empty").mkdir()
    (folders / "empty" / "notes.txt").write_text("not an image")
    _write_images(folders / "mixed", 3, seed=2)
    _write_images(folders / "mixed_big", 1, seed=3, size=24)
    (folders / "mixed_big" / "000.png").rename(folders / "mixed" / "odd.png")
    return folders


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("a", "nowhere", "--features", "extractor.pt"), "nowhere: folder not found"),
        (("empty", "a", "--features", "extractor.pt"), "empty: no image files"),
        (("a", "mixed", "--features", "extractor.pt"), "odd.png: image is 24x24 but"),
        (("a", "b", "--features", "missing.pt"), "missing.pt: feature extractor not found"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(bad_folders: Path, args: tuple[str, ...], expected: str) -> None:
    done = _fid_cli(*args, cwd=bad_folders)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("python -m pipeline: error: ") and expected in lines[0]
    assert done.stdout == ""


def test_too_small_or_single_images_are_user_errors(tmp_path: Path, folders: Path) -> None:
    _write_images(tmp_path / "small", 3, seed=0, size=8)
    _write_images(tmp_path / "one", 1, seed=0)
    extractor = str(folders / "extractor.pt")
    with pytest.raises(UserError, match="at least 16x16"):
        fid_between_folders(tmp_path / "small", tmp_path / "small", features=extractor, batch_size=4, device="cpu")
    with pytest.raises(UserError, match="one: FID needs at least 2 images"):
        fid_between_folders(folders / "a", tmp_path / "one", features=extractor, batch_size=4, device="cpu")


def test_cli_help_names_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", "fid", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--features" in done.stdout
