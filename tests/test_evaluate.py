"""Evaluation: metric files and plots from real shards and model files, mode collapse exposed, 1 rank == 2 ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from pipeline import config, plots
from pipeline.data.loaders import eval_batches
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import load_manifest
from pipeline.distributed import DistEnv
from pipeline.evaluation import features as ev_feat
from pipeline.evaluation import generator as ev_gen
from pipeline.evaluation import segmenter as ev_seg
from pipeline.images import palette
from pipeline.models.features import TextureFeatureNet, load_feature_extractor, save_feature_extractor
from pipeline.models.gan import Generator, save_generator
from pipeline.models.segmenters import load_segmenter, save_segmenter
from pipeline.models.unet import UNet
from pipeline.tracking import RunLogger, file_sha256
from tests.conftest import ROOT, write_params

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", amp_dtype=None)
GAN_KEYS = {
    "fid", "fid_ratio", "kid_mean", "kid_std", "fid_features", "num_samples", "num_real", "precision", "recall",
    "density", "coverage", "diversity", "diversity_per_class", "fid_per_class", "baselines",
    "class_fidelity", "class_fidelity_per_class",
}  # fmt: skip
BASELINE_KEYS = {
    "fid_untrained", "fid_real", "recall_untrained", "recall_real", "diversity_untrained", "diversity_real",
    "fid_per_class_real", "num_real_train", "class_fidelity_untrained", "class_fidelity_real",
}  # fmt: skip
SEGMENTER_KEYS = {"miou", "pixel_accuracy", "iou", "absent_classes", "num_images", "num_pixels"}
SEGMENTER_KEYS |= {"miou_single_view", "pixel_accuracy_single_view"}
PER_CLASS = {"fid_per_class", "diversity_per_class", "fid_per_class_real", "iou", "class_fidelity_per_class"}


def write_models(cfg: config.Config, shard_dir: Path, root: Path) -> Path:
    """Untrained generator, segmenter and feature extractor saved with the real save functions under ``root/models``."""
    classes = load_manifest(shard_dir)["classes"]
    torch.manual_seed(0)
    models = root / "models"
    generator = Generator(len(classes), cfg.gan.z_dim, cfg.gan.channels, cfg.data.patch_size)
    save_generator(models / "gan/generator.pt", generator, {"classes": classes, "step": 0})
    unet = UNet(len(classes), cfg.segmenter.channels, cfg.segmenter.depth)
    save_segmenter(models / "segmenter/model.pt", unet, {"classes": classes})
    net = TextureFeatureNet(len(classes), cfg.evaluate.feature_dim)
    save_feature_extractor(models / "features/extractor.pt", net, {"classes": classes})
    return models


def write_run_records(cfg: config.Config, models: Path) -> dict[str, str]:
    """A real MLflow run per training stage, and its run.json, as the training stages leave them."""
    run_ids = {}
    for name in ("gan", "segmenter"):
        logger = RunLogger(cfg, f"train_{name}", enabled=True)
        run_ids[name] = logger.start({"seed": cfg.seed}, {})
        logger.end()
        (models / name / "run.json").write_text(json.dumps({"run_id": run_ids[name]}))
    return run_ids


@pytest.fixture(scope="module")
def tiny_models(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[config.Config, Path]:
    root = tmp_path_factory.mktemp("models")
    cfg = config.load(write_params(root))
    return cfg, write_models(cfg, tiny_shards, root)


def test_gan_report_has_the_contract_keys(tiny_models, tiny_shards: Path) -> None:
    cfg, models = tiny_models
    out = ev_gen.evaluate_gan(cfg, SINGLE, tiny_shards, models / "gan/generator.pt", models / "features/extractor.pt")
    m, classes = out["metrics"], load_manifest(tiny_shards)["classes"]
    assert set(m) == GAN_KEYS and set(m["baselines"]) == BASELINE_KEYS
    assert m["fid_features"] == file_sha256(models / "features/extractor.pt")
    assert m["fid_ratio"] == pytest.approx(m["fid"] / m["baselines"]["fid_untrained"])
    assert m["num_samples"] == len(classes) * cfg.evaluate.samples_per_class
    assert m["num_real"] == load_manifest(tiny_shards)["splits"]["test"]["patches"]["samples"]
    assert m["baselines"]["num_real_train"] == m["num_samples"]  # same count as the generated set
    for key in ("fid", "kid_mean", "kid_std", "density", "diversity"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    for key in ("precision", "recall", "coverage"):
        assert 0.0 <= m[key] <= 1.0, key
    assert list(m["fid_per_class"]) == classes and list(m["diversity_per_class"]) == classes
    real_per_class = m["baselines"]["fid_per_class_real"]
    assert list(real_per_class) == classes and all(v is None or math.isfinite(v) for v in real_per_class.values())
    # The untrained generator is the one saved here (same seed, same weights class): similar numbers,
    # and real train patches are far closer to the test patches than any untrained generator.
    assert m["baselines"]["fid_real"] < m["baselines"]["fid_untrained"]
    assert m["baselines"]["recall_real"] > m["baselines"]["recall_untrained"]
    json.dumps(m, allow_nan=False)  # JSON-ready: no NaN, only plain types
    grid = out["plots"]
    assert len(grid["real"]) == len(grid["generated"]) == len(classes)
    assert grid["generated"][0].shape == (ev_gen.GRID_PER_CLASS, cfg.data.patch_size, cfg.data.patch_size, 3)
    assert grid["generated"][0].dtype == np.uint8


class CollapsedGenerator(Generator):
    """Mode collapse in its purest form: one fixed image per class (the class's mean colour), whatever z."""

    def __init__(self, images: Tensor) -> None:
        super().__init__(num_classes=images.shape[0], z_dim=4, channels=8, image_size=images.shape[-1])
        self.register_buffer("images", images * 2 - 1)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        return self.images[labels]


class ReplayGenerator(Generator):
    """A perfect (memorising) generator: each class's real test patches in turn."""

    def __init__(self, patches: list[Tensor]) -> None:
        super().__init__(num_classes=len(patches), z_dim=4, channels=8, image_size=patches[0].shape[-1])
        self.patches, self.drawn = patches, [0] * len(patches)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        out = []
        for c in labels.tolist():
            out.append(self.patches[c][self.drawn[c] % len(self.patches[c])])
            self.drawn[c] += 1
        return torch.stack(out) * 2 - 1


def _test_patches(shard_dir: Path, num_classes: int) -> list[Tensor]:
    batches = list(eval_batches(shard_dir, "patches", "test", 64, rank=0, world_size=1))
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return [images[labels == c] for c in range(num_classes)]


def test_mode_collapse_is_measured_not_hidden(tiny_models, tiny_shards: Path) -> None:
    _, models = tiny_models
    classes = load_manifest(tiny_shards)["classes"]
    extractor, _ = load_feature_extractor(models / "features/extractor.pt")
    real, real_labels = ev_feat.real_features(extractor, tiny_shards, "test", 16, SINGLE)
    patches = _test_patches(tiny_shards, len(classes))
    per_class = min(len(p) for p in patches)
    assert per_class >= 4 and all(len(p) == per_class for p in patches)

    def report(generator: Generator) -> dict[str, Any]:
        z, fake_labels = ev_gen.class_samples(len(classes), per_class, generator.z_dim, 7, 16)
        fake = ev_gen.generated_features(generator, extractor, z, fake_labels, 16, SINGLE)
        return ev_gen.gan_metrics(real, real_labels, fake, fake_labels, classes, k=2, seed=0)

    mean_colour = torch.stack([p.mean((0, 2, 3))[:, None, None].expand_as(p[0]) for p in patches])
    collapsed = report(CollapsedGenerator(mean_colour))
    replay = report(ReplayGenerator(patches))
    assert collapsed["recall"] <= 0.05 and collapsed["diversity"] <= 0.05
    assert all(v <= 0.05 for v in collapsed["diversity_per_class"].values())
    assert replay["recall"] >= 0.95 and replay["precision"] >= 0.95 and replay["coverage"] >= 0.95
    assert 0.95 <= replay["diversity"] <= 1.05
    assert replay["fid"] < 0.01 * collapsed["fid"]


def test_segmenter_report(tiny_models, tiny_shards: Path) -> None:
    cfg, models = tiny_models
    out = ev_seg.evaluate_segmenter(cfg, SINGLE, tiny_shards, models / "segmenter/model.pt")
    m, p = out["metrics"], out["plots"]
    manifest = load_manifest(tiny_shards)
    classes, side = manifest["classes"], manifest["params"]["mosaic_size"]
    assert set(m) == SEGMENTER_KEYS
    assert m["num_images"] == manifest["splits"]["test"]["mosaics"]["samples"]
    assert m["num_pixels"] == m["num_images"] * side * side == int(np.sum(p["confusion"]))
    assert list(m["iou"]) == classes
    assert m["absent_classes"] == [c for c, v in m["iou"].items() if v is None]
    present = [v for v in m["iou"].values() if v is not None]
    assert m["miou"] == pytest.approx(sum(present) / len(present))
    diagonal = np.trace(np.asarray(p["confusion"]))
    assert m["pixel_accuracy"] == pytest.approx(diagonal / m["num_pixels"])
    assert len(p["actual"]) == len(p["predicted"]) == min(ev_seg.CONFUSION_SAMPLES, m["num_pixels"])
    assert p["images"].shape == (ev_seg.SEGMENTATION_EXAMPLES, side, side, 3)


def test_segmenter_report_scores_the_served_views_and_one_view(tiny_models, tiny_shards: Path, tmp_path: Path) -> None:
    cfg, models = tiny_models
    model, meta = load_segmenter(models / "segmenter/model.pt")
    report = {}
    for tta in ("none", "d8"):
        net = UNet(**(model.kwargs | {"tta": tta}))
        net.load_state_dict(model.state_dict())
        save_segmenter(tmp_path / f"{tta}.pt", net, meta)
        report[tta] = ev_seg.evaluate_segmenter(cfg, SINGLE, tiny_shards, tmp_path / f"{tta}.pt")["metrics"]
    single, served = report["none"], report["d8"]
    assert single["miou"] == single["miou_single_view"] == served["miou_single_view"]
    assert single["pixel_accuracy"] == single["pixel_accuracy_single_view"] == served["pixel_accuracy_single_view"]


def test_pixel_sample_is_stratified_and_fixed() -> None:
    n, pixels = 7, 64 * 64
    counts = [len(ev_seg.pixel_sample(i, n, pixels, 1)) for i in range(n)]
    assert sum(counts) == ev_seg.CONFUSION_SAMPLES and max(counts) - min(counts) <= 1
    a = ev_seg.pixel_sample(3, n, pixels, 1)
    assert torch.equal(a, ev_seg.pixel_sample(3, n, pixels, 1)) and a.unique().numel() == a.numel()
    assert not torch.equal(a, ev_seg.pixel_sample(4, n, pixels, 1))
    assert len(ev_seg.pixel_sample(0, 2, 16, 1)) == 16  # small mosaics: every pixel


def test_plot_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    classes = ["stripes", "a,b", "dots"]
    real = [rng.integers(0, 255, (k, 16, 16, 3), dtype=np.uint8) for k in (3, 3, 1)]
    generated = [rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8) for _ in classes]
    (png,) = plots.write_gan_plots(tmp_path, {"classes": classes, "real": real, "generated": generated})
    with Image.open(png) as im:
        assert im.format == "PNG" and im.height >= 3 * 32 and im.width >= 7 * 32
    confusion = [[5, 5, 0], [0, 0, 0], [1, 0, 3]]
    assert plots.row_normalised(confusion).tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.25, 0.0, 0.75]]
    masks = rng.integers(0, 3, (2, 8, 8), dtype=np.uint8)
    data = {
        "classes": classes,
        "confusion": confusion,
        "actual": np.array([0, 2, 1]),
        "predicted": np.array([0, 0, 1]),
        "images": rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8),
        "truth": masks,
        "pred": masks,
    }
    written = plots.write_segmenter_plots(tmp_path, data)
    assert sorted(p.name for p in written) == sorted(
        [plots.CONFUSION_PNG, plots.SEGMENTATION_EXAMPLES, plots.CONFUSION_CSV]
    )
    per_class = {"iou": {"stripes": 0.5, "a,b": None, "dots": 0.25}, "fid_per_class": {"stripes": 123.456789}}
    assert plots.write_per_class_plots(tmp_path, per_class) == [tmp_path / "iou.csv", tmp_path / "fid_per_class.csv"]
    assert (tmp_path / "iou.csv").read_text() == "class,iou\nstripes,0.5\ndots,0.25\n"  # no IoU: left out
    assert (tmp_path / "fid_per_class.csv").read_text() == "class,fid_per_class\nstripes,123.457\n"
    assert (
        tmp_path / plots.CONFUSION_CSV
    ).read_text() == 'actual,predicted\nstripes,stripes\ndots,stripes\n"a,b","a,b"\n'
    for name in (plots.CONFUSION_PNG, plots.SEGMENTATION_EXAMPLES):
        with Image.open(tmp_path / name) as im:
            im.verify()
    colours = palette(25)
    assert colours.shape == (25, 3) and len({tuple(c) for c in colours.tolist()}) == 25


def test_headline_leaves_the_per_class_values_to_plots() -> None:
    from stages.evaluate import split_per_class

    classes = ["stripes", "dots"]
    gan = {
        "fid": 40.0,
        "fid_per_class": {"stripes": 30.0, "dots": None},
        "baselines": {"fid_real": 3.0, "fid_per_class_real": {"dots": 2.0, "stripes": 4.0}},
        "absent_classes": ["dots"],
        "counts": {"stripes": 1},  # keyed by some classes only: not a per-class value
    }
    headline, per_class = split_per_class(gan, classes)
    assert headline == {
        "fid": 40.0,
        "baselines": {"fid_real": 3.0},
        "absent_classes": ["dots"],
        "counts": {"stripes": 1},
    }
    assert per_class == {
        "fid_per_class": gan["fid_per_class"],
        "fid_per_class_real": gan["baselines"]["fid_per_class_real"],
    }
    assert "fid_per_class" in gan and "fid_per_class_real" in gan["baselines"]  # the full dict is left alone


def _dvc_yaml_plots() -> set[str]:
    """The plot files the evaluate stage declares in dvc.yaml."""
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    return {next(iter(p)) if isinstance(p, dict) else p for p in stage["plots"]}


def test_missing_model_file_is_one_line_exit_2(tiny_models, tiny_shards: Path, tmp_path: Path, capsys) -> None:
    from stages.evaluate import main

    _, models = tiny_models
    params = write_params(tmp_path)
    args = ["--params", str(params), "--shards", str(tiny_shards), "--features", str(models / "features/extractor.pt")]
    args += ["--gan", str(tmp_path / "nowhere"), "--segmenter", str(models / "segmenter")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nowhere" / "generator.pt") in err[0] and err[0].startswith("evaluate:")


# ---------------------------------------------------------------- the stage as a process, 1 and 2 ranks

ODD = {  # 3 classes x 1 test source x 7 patches = 21 test patches, 21 test mosaics: neither divides by 2
    "data.classes": ["stripes", "checker", "dots"],
    "data.patches_per_source": 7,
    "evaluate.batch_size": 4,  # 15 generated samples = 4 chunks of 4, 4, 4, 3: both ranks generate
}


def _assert_close(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12), f"{where}: {a} != {b}"  # float32 across batchings
    else:
        assert a == b, where


def _read_per_class(path: Path) -> dict[str, float]:
    """A per-class plot CSV (``class,<key>``) as class -> value."""
    _, *rows = path.read_text().splitlines()
    return {name: float(value) for name, value in (row.split(",") for row in rows)}


def _run_stage(workdir: Path, nproc: int | None, out: str) -> subprocess.CompletedProcess:
    launcher = [] if nproc is None else ["-m", "pipeline.launch", "--nproc", str(nproc)]
    cmd = [sys.executable, *launcher, str(ROOT / "stages/evaluate.py"), "--params", "params.yaml"]
    cmd += ["--shards", "shards", "--features", "models/features/extractor.pt", "--gan", "models/gan"]
    cmd += ["--segmenter", "models/segmenter", "--metrics-dir", f"{out}/metrics", "--plots-dir", f"{out}/plots"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_stage_writes_metrics_and_plots_and_two_ranks_match_one(tmp_path: Path) -> None:
    import mlflow

    cfg = config.load(write_params(tmp_path, ODD))
    manifest = prepare_dataset(cfg, tmp_path / "shards", progress=False)
    test = manifest["splits"]["test"]
    assert test["patches"]["samples"] % 2 == 1 and test["mosaics"]["samples"] % 2 == 1
    run_ids = write_run_records(cfg, write_models(cfg, tmp_path / "shards", tmp_path))

    single = _run_stage(tmp_path, None, "one")
    assert single.returncode == 0, single.stderr[-3000:]
    assert "GAN: FID" in single.stdout
    files = ("metrics/gan.json", "metrics/segmenter.json", "plots/gan_samples.png", "plots/confusion_matrix.png")
    files += ("plots/segmentation_examples.png", "plots/confusion.csv")
    for name in files + tuple(f"plots/{key}.csv" for key in PER_CLASS):
        assert (tmp_path / "one" / name).stat().st_size > 0, name
    # dvc.yaml declares every plot file the stage writes (a new per-class value needs its bar plot there).
    assert {f"plots/{p.name}" for p in (tmp_path / "one/plots").iterdir()} == _dvc_yaml_plots()
    gan = json.loads((tmp_path / "one/metrics/gan.json").read_text())
    seg = json.loads((tmp_path / "one/metrics/segmenter.json").read_text())
    assert set(gan) == GAN_KEYS - PER_CLASS and set(gan["baselines"]) == BASELINE_KEYS - PER_CLASS
    assert set(seg) == SEGMENTER_KEYS - PER_CLASS and gan["num_samples"] == 15
    fid_csv = (tmp_path / "one/plots/fid_per_class.csv").read_text().splitlines()
    assert fid_csv[0] == "class,fid_per_class" and [row.split(",")[0] for row in fid_csv[1:]] == ODD["data.classes"]

    # MLflow keeps the whole evaluation: every value as a test_* metric and as evaluation/<model>_full.json.
    client = mlflow.MlflowClient()
    logged = client.get_run(run_ids["gan"]).data.metrics
    assert logged["test_fid"] == gan["fid"] and logged["test_baselines/fid_real"] == gan["baselines"]["fid_real"]
    assert {f"test_fid_per_class/{c}" for c in ODD["data.classes"]} <= logged.keys()
    assert {f"test_baselines/fid_per_class_real/{c}" for c in ODD["data.classes"]} <= logged.keys()
    seg_logged = client.get_run(run_ids["segmenter"]).data.metrics
    assert seg_logged["test_miou"] == seg["miou"] and "test_iou/stripes" in seg_logged
    artifacts = {f.path for f in client.list_artifacts(run_ids["segmenter"], "evaluation")}
    assert {"evaluation/segmenter_full.json", "evaluation/confusion_matrix.png", "evaluation/iou.csv"} <= artifacts
    full = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(run_id=run_ids["gan"], artifact_path="evaluation/gan_full.json")
        ).read_text()
    )
    assert set(full) == GAN_KEYS and set(full["baselines"]) == BASELINE_KEYS
    assert {k: v for k, v in full.items() if k not in PER_CLASS} | {"baselines": gan["baselines"]} == gan

    double = _run_stage(tmp_path, 2, "two")
    assert double.returncode == 0, double.stderr[-3000:]
    for name in ("gan.json", "segmenter.json"):
        one, two = (json.loads((tmp_path / d / "metrics" / name).read_text()) for d in ("one", "two"))
        _assert_close(one, two, name)
    for key in PER_CLASS:
        one, two = (_read_per_class(tmp_path / d / "plots" / f"{key}.csv") for d in ("one", "two"))
        _assert_close(one, two, key)
    assert (tmp_path / "one/plots/confusion.csv").read_text() == (tmp_path / "two/plots/confusion.csv").read_text()
