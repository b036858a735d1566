"""The registered pyfunc models in use: loading by alias in a fresh process, GAN sampling, the CLI folder
helpers, ``mlflow models serve`` over HTTP, and what the MLflow UI shows (REST + headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import config, registry, serving, use
from pipeline.images import palette, to_uint8
from pipeline.models.gan import build_generator, generate_images, load_generator, save_generator
from pipeline.models.segmenters import load_segmenter, save_segmenter, segmenter_from_config
from pipeline.tracking import RunLogger, file_sha256

pytest.register_assert_rewrite("tests.mlflow_server")  # imported here before pytest_plugins loads it
from tests.mlflow_server import (  # noqa: E402
    FakeTraining,
    MlflowServer,
    background,
    child_env,
    free_port,
)

pytest_plugins = ["tests.mlflow_server"]

SEG = "texture-segmenter"
GAN = "texture-gan"


def register_segmenter(cfg: config.Config, fake_training: FakeTraining, model_dir: Path | None = None) -> Path:
    model_dir = model_dir or fake_training("segmenter")
    metrics = {"miou": 0.7, "pixel_accuracy": 0.9, "iou": {}, "num_images": 3}
    assert registry.register_model(cfg, "segmenter", model_dir, metrics)["aliases"] == ["champion"]
    return model_dir / "model.pt"


def register_gan(cfg: config.Config, fake_training: FakeTraining, model_dir: Path | None = None) -> None:
    metrics = {"fid": 40.0, "fid_ratio": 0.2, "recall": 0.2, "diversity": 0.9, "fid_features": "f" * 64}
    metrics["class_fidelity"] = 0.6
    assert registry.register_model(cfg, "gan", model_dir or fake_training("gan"), metrics)["aliases"] == ["champion"]


def local_masks(model_file: Path, images: np.ndarray) -> np.ndarray:
    model, _ = load_segmenter(model_file)
    with torch.no_grad():
        return model(torch.tensor(images).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()


def random_images(n: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_segmenter_loads_by_alias_in_a_fresh_process(
    tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining, tmp_path: Path
) -> None:
    model_file = register_segmenter(tiny_cfg, fake_training)
    images = random_images(2, 20, 28)  # not a multiple of the U-Net's pooling: any size in, same size out
    np.save(tmp_path / "in.npy", images)
    script = (
        "import json, sys, mlflow, numpy as np\n"
        f"model = mlflow.pyfunc.load_model('models:/{SEG}@champion')\n"
        "out = model.predict(np.load(sys.argv[1]))\n"
        "np.save(sys.argv[2], out)\n"
        "print(json.dumps({'dtype': str(out.dtype), 'classes': model.metadata.metadata['classes']}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"dtype": "int64", "classes": list(tiny_cfg.data.classes)}
    masks = np.load(tmp_path / "out.npy")
    assert masks.shape == (2, 20, 28)
    np.testing.assert_array_equal(masks, local_masks(model_file, images))


def test_gan_pyfunc_takes_class_names_and_indices(
    tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining
) -> None:
    register_gan(tiny_cfg, fake_training)
    model = registry.load_pyfunc(f"models:/{GAN}@champion")
    classes = list(tiny_cfg.data.classes)
    assert model.metadata.metadata["classes"] == classes
    table = pd.DataFrame({"class": ["dots", 2, "2", "dots", "stripes"], "seed": [5, 5, 5, 6, 5]})
    images = model.predict(table)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert classes.index("dots") == 2
    np.testing.assert_array_equal(images[0], images[1])  # name, index and index-as-text: same class
    np.testing.assert_array_equal(images[0], images[2])
    assert not np.array_equal(images[0], images[3])  # another seed
    assert not np.array_equal(images[0], images[4])  # another class
    np.testing.assert_array_equal(model.predict(table.iloc[[3]]), images[3:4])  # a row does not depend on others
    with pytest.raises(serving.UnknownClassError, match=r"unknown class 'bricks'; known classes: stripes, "):
        model.predict(pd.DataFrame({"class": ["bricks"], "seed": [0]}))
    with pytest.raises(serving.UnknownClassError, match=r"unknown class 4; expected a name or an index in \[0, 3\]"):
        model.predict(pd.DataFrame({"class": [4], "seed": [0]}))


@pytest.mark.parametrize("arch", ["fcn", "deeplabv3", "segformer", "renet"])
def test_segmenter_pyfunc_serves_every_family(
    arch: str, tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining
) -> None:
    """The served segmenter loads whatever family the file holds and labels any image size as that family does."""
    model_dir = fake_training("segmenter")
    _, meta = load_segmenter(model_dir / "model.pt")
    torch.manual_seed(0)
    save_segmenter(model_dir / "model.pt", segmenter_from_config(tiny_cfg.segmenter, len(meta["classes"]), arch), meta)
    model_file = register_segmenter(tiny_cfg, fake_training, model_dir)
    model = registry.load_pyfunc(f"models:/{SEG}@champion")
    images = random_images(2, 20, 28)
    masks = model.predict(images)
    assert masks.shape == (2, 20, 28)
    np.testing.assert_array_equal(masks, local_masks(model_file, images))
    assert load_segmenter(model_file)[0].arch == arch


@pytest.mark.parametrize("arch", ["resnet", "vae"])
def test_gan_pyfunc_serves_every_generator_family(
    arch: str, tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining
) -> None:
    """The served model loads whatever family the file holds (the one model file names it), unknown in advance."""
    model_dir = fake_training("gan")
    _, meta = load_generator(model_dir / "generator.pt")
    torch.manual_seed(0)
    generator = build_generator(arch, num_classes=len(meta["classes"]), z_dim=8, channels=8, image_size=16, attention=8)
    save_generator(model_dir / "generator.pt", generator, meta)
    register_gan(tiny_cfg, fake_training, model_dir)
    model = registry.load_pyfunc(f"models:/{GAN}@champion")
    images = model.predict(pd.DataFrame({"class": ["dots", "stripes"], "seed": [5, 5]}))
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    labels = torch.tensor([meta["classes"].index("dots"), meta["classes"].index("stripes")])
    expected = torch.cat([generate_images(generator, labels[i : i + 1], 5, 1, "cpu") for i in range(2)])
    np.testing.assert_array_equal(images, to_uint8(expected))


def test_generate_and_segment_to_folder(
    tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining, tmp_path: Path
) -> None:
    register_gan(tiny_cfg, fake_training)
    model_file = register_segmenter(tiny_cfg, fake_training)
    generated = use.generate_to_folder(f"models:/{GAN}@champion", ["dots", "0"], 2, 3, tmp_path / "gen")
    names = ["dots_0000.png", "dots_0001.png", "stripes_0000.png", "stripes_0001.png"]
    assert [p.name for p in generated] == names
    expected = registry.load_pyfunc(f"models:/{GAN}@champion").predict(pd.DataFrame({"class": ["dots"], "seed": [4]}))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "gen" / "dots_0001.png")), expected[0])

    masks = use.segment_to_folder(f"models:/{SEG}@champion", generated, tmp_path / "seg")
    assert [p.name for p in masks] == [n.replace(".png", ".mask.png") for n in names]
    for image_path, mask_path in zip(generated, masks, strict=True):
        image = np.asarray(Image.open(image_path))
        with Image.open(mask_path) as mask:
            assert mask.mode == "L" and mask.size == (16, 16)
            np.testing.assert_array_equal(np.asarray(mask), local_masks(model_file, image[None])[0])
            labels = np.asarray(mask)
        with Image.open(mask_path.with_name(mask_path.name.replace(".mask.", ".preview."))) as preview:
            assert preview.mode == "RGB" and preview.size == (32, 16)
            np.testing.assert_array_equal(np.asarray(preview)[:, :16], image)
            np.testing.assert_array_equal(np.asarray(preview)[:, 16:], palette(4)[labels])  # the DVC plots' colours

    with pytest.raises(serving.UnknownClassError, match="unknown class 'bricks'"):
        use.generate_to_folder(f"models:/{GAN}@champion", ["bricks"], 1, 0, tmp_path / "none")


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(
    tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining, tmp_path: Path
) -> None:
    model_file = register_segmenter(tiny_cfg, fake_training)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{SEG}@champion"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    # child_env() puts the venv's bin/ first on PATH: `mlflow models serve` starts `uvicorn` by name.
    with background(cmd, tmp_path / "serve.log", f"{url}/ping", env=child_env()):
        images = random_images(2, 24, 20)
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = np.asarray(json.load(response)["predictions"])
    assert predictions.shape == (2, 24, 20)
    np.testing.assert_array_equal(predictions, local_masks(model_file, images))


def _get(url: str, payload: dict[str, Any] | None = None) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read().decode()
    return json.loads(body) if body.lstrip().startswith("{") else body


def test_ui_and_its_api_show_the_champion(
    tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining
) -> None:
    register_segmenter(tiny_cfg, fake_training)
    base = tracking_server.url
    page = _get(f"{base}/")
    assert "<title>MLflow</title>" in page and "<script" in page  # the single-page app the browser loads
    api = f"{base}/ajax-api/2.0/mlflow"  # the endpoints that page calls
    query = urllib.parse.urlencode({"name": SEG, "alias": "champion"})
    assert _get(f"{api}/registered-models/alias?{query}")["model_version"]["version"] == "1"
    model = _get(f"{api}/registered-models/get?name={SEG}")["registered_model"]
    assert {"alias": "champion", "version": "1"} in model["aliases"]
    experiment = _get(f"{api}/experiments/get-by-name?experiment_name={tiny_cfg.mlflow.experiment}")["experiment"]
    runs = _get(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert "train_segmenter" in {r["info"]["run_name"] for r in runs}


def _visible_text(dom: str) -> str:
    """The text a user reads in a dumped DOM: no scripts or styles, tags as spaces, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium on this machine (.ci/run installs Debian's chromium)")
def test_ui_in_headless_chromium(
    tiny_cfg: config.Config,
    tracking_server: MlflowServer,
    fake_training: FakeTraining,
    tiny_shards: Path,
    tmp_path: Path,
) -> None:
    register_segmenter(tiny_cfg, fake_training)
    training = RunLogger(tiny_cfg, "train_gan", enabled=True)  # as the training loop logs it
    training.start({"gan.steps": 4}, {}, shards=tiny_shards, kind="patches")
    training.end()
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    browser += [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=20000"]

    def render(fragment: str, *args: str) -> str:
        result = subprocess.run(
            [*browser, *args, f"{tracking_server.url}/#/{fragment}"], capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    dom = render(f"models/{SEG}", "--dump-dom")
    assert SEG in dom and "champion" in dom and "Version 1" in dom
    experiment_id = registry.connect(tiny_cfg)[0].get_experiment_by_name(tiny_cfg.mlflow.experiment).experiment_id
    dom = render(f"experiments/{experiment_id}/runs", "--dump-dom")
    assert tiny_cfg.mlflow.experiment in dom and "train_segmenter" in dom
    # MLflow 3.18 picks the view by its GenAI | Model training switch (this URL parameter, or the
    # user's last choice); older 3.x UIs by the experiment's mlflow.experimentKind tag.
    page = _visible_text(render(f"experiments/{experiment_id}?workflowType=machine_learning", "--dump-dom"))
    assert page.startswith("Runs - Experiment") and "Send your first trace" not in page  # not the GenAI overview
    row = page[page.index("train_gan") :]
    digest = file_sha256(tiny_shards / "manifest.json")[:16]
    assert row.index(f"patches/train ({digest}) training") < row.index("train_gan.py")  # Dataset, then Source
    screenshot = tmp_path / "model-page.png"
    render(f"models/{SEG}", f"--screenshot={screenshot}")
    with Image.open(screenshot) as shot:
        assert shot.width >= 640 and shot.height >= 480
        assert len(np.unique(np.asarray(shot.convert("L")))) > 10  # a rendered page, not a blank canvas
