"""Every segmenter family: shapes, test-time views, SyncBN conversion, the one model file, overfitting real
mosaics; the ``segmenter.arch`` switch and the model catalog."""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from pipeline import checkpoint, config
from pipeline.checkpoint import CheckpointError
from pipeline.data.loaders import eval_batches
from pipeline.distributed import SyncBatchNorm2d, convert_sync_batchnorm
from pipeline.metrics.segmentation import ConfusionMatrix
from pipeline.models import unet
from pipeline.models.catalog import describe_models, format_models
from pipeline.models.gan import Discriminator, Generator, discriminator_batch_norm
from pipeline.models.segmenter_base import Segmenter
from pipeline.models.segmenters import (
    SEGMENTERS,
    build_segmenter,
    load_segmenter,
    save_segmenter,
    segmenter_from_config,
)
from pipeline.training.segmenter import segmentation_loss
from tests.conftest import ROOT

# Small widths: seconds on a CPU, yet every part of each network (a family's sub-layers, every stage) is there.
SMALL: dict[str, dict] = {
    "unet": {"channels": 8, "depth": 3, "decoder": "add"},
    "fcn": {"channels": 4, "convs": 1},
    "deeplabv3": {"channels": 8, "blocks": 1, "output_stride": 8},
    "segformer": {"dim": 8, "blocks": 1},
    "renet": {"channels": 8, "hidden": 8, "layers": 1, "cell": "gru"},
}
ARCHS = list(SEGMENTERS)
VARIANTS = [
    ("unet", {}),
    ("fcn", {"convs": 2}),
    ("deeplabv3", {}),
    ("deeplabv3", {"output_stride": 16, "blocks": 2}),
    ("segformer", {"blocks": 2}),
    ("renet", {}),
    ("renet", {"cell": "lstm", "layers": 2}),
]


def _model(arch: str, num_classes: int = 4, **overrides: object) -> Segmenter:
    torch.manual_seed(0)
    return build_segmenter(arch, num_classes, **(SMALL[arch] | overrides))


def _trained_bn(model: Segmenter) -> Segmenter:
    """``model`` in eval mode with BatchNorm statistics moved off their defaults by one training forward."""
    model.train()
    model(torch.rand(4, 3, 32, 32))
    return model.eval()


def test_the_registry_is_the_config_switch() -> None:
    arch_type = typing.get_type_hints(config.SegmenterConfig)["arch"]
    assert typing.get_args(arch_type) == tuple(SEGMENTERS)
    assert all(cls.arch == name for name, cls in SEGMENTERS.items())
    assert config.load(ROOT / "params.yaml").segmenter.arch == "unet"


@pytest.mark.parametrize(("arch", "overrides"), VARIANTS)
@pytest.mark.parametrize("size", [(64, 64), (32, 48), (37, 50), (5, 9)])
def test_logits_have_the_input_size(arch: str, overrides: dict, size: tuple[int, int]) -> None:
    model = _model(arch, **overrides)
    logits = model(torch.rand(2, 3, *size))
    assert logits.shape == (2, 4, *size)
    assert torch.isfinite(logits).all()
    assert model.eval().logits(torch.rand(1, 3, *size)).shape == (1, 4, *size)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 32, 32))


def test_each_family_reads_its_documented_resolutions() -> None:
    """The stride where each family computes: FCN's three score maps, DeepLab's ASPP at the output stride,
    SegFormer's four stages, ReNet's sweeps at stride 4."""
    seen: dict[str, list[tuple[int, ...]]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        return lambda mod, inp, out: seen.setdefault(name, []).append(tuple(out.shape[-2:]))

    x = torch.rand(1, 3, 64, 64)
    fcn = _model("fcn")
    for name in ("score32", "score16", "score8"):
        getattr(fcn, name).register_forward_hook(record(name))
    fcn(x)
    assert (seen["score32"], seen["score16"], seen["score8"]) == ([(2, 2)], [(4, 4)], [(8, 8)])
    for stride in (8, 16):
        deeplab = _model("deeplabv3", output_stride=stride)
        deeplab.aspp.register_forward_hook(record(f"aspp{stride}"))
        deeplab(x)
        assert seen[f"aspp{stride}"] == [(64 // stride, 64 // stride)]
    segformer = _model("segformer")
    for stage in segformer.stages:
        stage.register_forward_hook(record("stages"))
    segformer(x)
    assert seen["stages"] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    renet = _model("renet")
    renet.sweeps[0].register_forward_hook(record("sweep"))
    renet(x)
    assert seen["sweep"] == [(16, 16)]


def test_renet_sweeps_see_the_whole_map_and_fcn_starts_from_stride_32() -> None:
    """One ReNet layer links every output pixel to every input pixel (a row sweep, then a column sweep), which
    its few convs alone could not; FCN's finer score layers start at zero (the paper's initialisation)."""
    model = _model("renet").eval()
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    model(x)[0, :, 0, 0].sum().backward()
    assert x.grad is not None and x.grad[0, :, 28:, 28:].abs().sum() > 0
    fcn = _model("fcn")
    assert not fcn.score8.weight.any() and not fcn.score16.weight.any()


def _views(group: str) -> list[tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]]:
    """(transform, inverse) pairs of the flip group or the dihedral group of the square, written independently
    of the models' table of views (the d8 elements as turns and turned transposes)."""

    def turn(k: int) -> Callable[[Tensor], Tensor]:
        return lambda t: t.rot90(k, (2, 3))

    def transpose(t: Tensor) -> Tensor:
        return t.transpose(2, 3)

    if group == "flip":
        flips = [(), (2,), (3,), (2, 3)]
        return [(lambda t, d=d: t.flip(d) if d else t, lambda t, d=d: t.flip(d) if d else t) for d in flips]
    out = []
    for k in range(4):
        out.append((turn(k), turn(-k)))
        out.append((lambda t, k=k: turn(k)(transpose(t)), lambda t, k=k: transpose(turn(-k)(t))))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tta", ["flip", "d8"])
def test_tta_is_the_mean_of_the_transformed_views(arch: str, tta: str) -> None:
    model = _trained_bn(_model(arch, tta=tta))
    x = torch.rand(2, 3, 64, 64)  # FCN's stride-32 scores need more than one cell to differ between views
    with torch.no_grad():
        out = model(x)
        views = _views(tta)
        mean = sum(inverse(model.logits(move(x)).softmax(1)) for move, inverse in views) / len(views)
        single = model.logits(x)
    assert len(views) == {"flip": 4, "d8": 8}[tta]
    torch.testing.assert_close(out, mean.log(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, single.log_softmax(1), atol=1e-3)  # the views differ: averaging did something
    model.train()
    torch.manual_seed(1)
    train_out = model(x)
    torch.manual_seed(1)
    assert torch.equal(train_out, model.logits(x))  # training sees one view


@pytest.mark.parametrize("arch", ARCHS)
def test_sync_bn_conversion_keeps_the_eval_forward(arch: str) -> None:
    model = _trained_bn(_model(arch))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    converted = convert_sync_batchnorm(copy.deepcopy(model), torch.device("cpu")).eval()
    assert bn > 0 and sum(isinstance(m, SyncBatchNorm2d) for m in converted.modules()) == bn
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert converted.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("arch", "overrides"), VARIANTS)
def test_one_loader_rebuilds_every_family(arch: str, overrides: dict, tmp_path: Path) -> None:
    model = _trained_bn(_model(arch, tta="flip", **overrides))
    meta = {"classes": ["a", "b", "c", "d"], "run_id": "abc", "val_miou": 0.5}
    path = tmp_path / "model.pt"
    save_segmenter(path, convert_sync_batchnorm(copy.deepcopy(model), torch.device("cpu")), meta)
    assert torch.load(path, weights_only=True)["kwargs"]["arch"] == arch
    loaded, loaded_meta = load_segmenter(path)
    assert type(loaded) is type(model) and loaded.kwargs == model.kwargs and not loaded.training
    assert loaded_meta == meta
    assert not any(isinstance(m, SyncBatchNorm2d) for m in loaded.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_files_without_an_arch_are_unets_and_unknown_archs_are_rejected(tmp_path: Path) -> None:
    model = _trained_bn(_model("unet"))
    legacy = tmp_path / "legacy.pt"
    checkpoint.save_model(legacy, model, model.kwargs, {"classes": ["a", "b", "c", "d"]})  # today's file format
    loaded, _ = load_segmenter(legacy)
    x = torch.rand(1, 3, 24, 24)
    assert type(loaded) is unet.UNet
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    alien = tmp_path / "alien.pt"
    checkpoint.save_model(alien, model, {"arch": "vit", **model.kwargs}, {})
    with pytest.raises(CheckpointError, match=r"alien\.pt: not a segmenter model file .*unknown segmenter arch 'vit'"):
        load_segmenter(alien)
    mismatched = tmp_path / "mismatched.pt"
    checkpoint.save_model(mismatched, model, {"arch": "fcn", **SMALL["fcn"], "num_classes": 4}, {})
    with pytest.raises(CheckpointError, match="not a segmenter model file"):
        load_segmenter(mismatched)
    with pytest.raises(TypeError, match="expected a segmenter"):
        save_segmenter(tmp_path / "x.pt", nn.Linear(2, 2), {})
    with pytest.raises(ValueError, match="unknown segmenter arch 'vit'; expected one of unet, fcn, deeplabv3"):
        build_segmenter("vit", 4)


@pytest.mark.parametrize(
    ("arch", "kwargs", "message"),
    [
        ("fcn", {"convs": 0}, "convs >= 1"),
        ("deeplabv3", {"output_stride": 32}, "output_stride must be 8 or 16"),
        ("segformer", {"dim": 0}, "dim >= 1"),
        ("renet", {"cell": "rnn"}, "cell must be one of gru, lstm"),
        ("renet", {"tta": "d4"}, "tta must be one of"),
    ],
)
def test_bad_arguments_raise(arch: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_segmenter(arch, 4, **(SMALL[arch] | kwargs))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"segmenter.arch": "vit"},
            "params.yaml: segmenter.arch: expected one of 'unet', 'fcn', 'deeplabv3', 'segformer', 'renet', got 'vit'",
        ),
        (
            {"segmenter.deeplabv3.output_stride": 32},
            "params.yaml: segmenter.deeplabv3.output_stride: expected one of 8",
        ),
        ({"segmenter.renet.cell": "rnn"}, "params.yaml: segmenter.renet.cell: expected one of 'gru', 'lstm'"),
        ({"segmenter.segformer.blocks": 0}, "params.yaml: segmenter.segformer.blocks: expected an integer in [1, 4]"),
        ({"segmenter.fcn.width": 8}, "params.yaml: segmenter.fcn.width: unknown key"),
    ],
)
def test_bad_family_params_stop_with_one_line(override: dict, message: str) -> None:
    raw = config.load_raw(ROOT / "params.yaml")
    for key, value in override.items():
        config.set_dotted(raw, key, value)
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_params_build_each_family(tiny_cfg: config.Config) -> None:
    s = tiny_cfg.segmenter
    default = segmenter_from_config(s, 4)
    assert type(default) is unet.UNet
    assert default.kwargs == {
        "num_classes": 4,
        "channels": s.channels,
        "depth": s.depth,
        "upsample": s.upsample,
        "dropout": s.dropout,
        "dilated_bottleneck": s.dilated_bottleneck,
        "decoder": s.decoder,
        "tta": s.tta,
    }
    segformer = segmenter_from_config(s, 4, "segformer")
    assert segformer.kwargs == {"num_classes": 4, "dim": s.segformer.dim, "blocks": s.segformer.blocks, "tta": s.tta}
    cfg = config.load(ROOT / "params.yaml", {"segmenter.arch": "renet", "segmenter.renet.cell": "lstm"})
    model = segmenter_from_config(cfg.segmenter, 4)
    assert isinstance(model, SEGMENTERS["renet"]) and model.kwargs["cell"] == "lstm"
    assert isinstance(model.sweeps[0].rows, nn.LSTM)


def _mosaics(shards: Path, count: int) -> tuple[Tensor, Tensor]:
    images, masks = next(eval_batches(shards, "mosaics", "train", count, rank=0, world_size=1))
    assert len(images) == count and len(masks.unique()) >= 2
    return images, masks


def _miou(model: Segmenter, images: Tensor, masks: Tensor) -> float:
    model.eval()
    matrix = ConfusionMatrix(model.num_classes)
    with torch.no_grad():
        matrix.update(model(images).argmax(1), masks)
    return matrix.compute()["miou"]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_family_overfits_a_few_real_mosaics(arch: str, tiny_shards: Path) -> None:
    """CE + Dice, Adam, at most 200 steps on 4 real 32-px mosaics: eval-mode (one view) pixel mIoU > 0.9."""
    images, masks = _mosaics(tiny_shards, 4)
    classes = len(json.loads((tiny_shards / "manifest.json").read_text())["classes"])
    model = _model(arch, classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = _miou(model, images, masks)
    miou = start
    for step in range(1, 201):
        model.train()
        loss, _ = segmentation_loss(model(images), masks, 1.0, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            miou = _miou(model, images, masks)
            if miou > 0.9:
                break
    assert start < 0.5 and miou > 0.9, (arch, start, miou)


def test_catalog_lists_every_family_with_its_size(tiny_cfg: config.Config) -> None:
    rows = describe_models(tiny_cfg)
    classes = len(tiny_cfg.data.classes)
    segmenters = [r for r in rows if r["kind"] == "segmenter"]
    assert [r["family"] for r in segmenters] == ARCHS
    for r in segmenters:
        model = segmenter_from_config(tiny_cfg.segmenter, classes, r["family"])
        assert r["parameters"] == sum(p.numel() for p in model.parameters()) > 0
        assert r["selected_by"] == f"segmenter.arch={r['family']}" and r["in_use"] == (r["family"] == "unet")
    gan = tiny_cfg.gan
    generator = Generator(classes, gan.z_dim, gan.channels, tiny_cfg.data.patch_size, gan.fourier, gan.fourier_warp)
    by_kind = {r["kind"]: r for r in rows if r["family"] == "dcgan"}
    assert by_kind["generator"]["parameters"] == sum(p.numel() for p in generator.parameters())
    discriminator = Discriminator(
        classes, gan.channels, tiny_cfg.data.patch_size, gan.conditioning, gan.spectral_norm,
        batch_norm=discriminator_batch_norm(gan),
    )  # fmt: skip
    assert by_kind["discriminator"]["parameters"] == sum(p.numel() for p in discriminator.parameters())
    table = format_models(rows).splitlines()
    assert len(table) == len(rows) + 1 and table[0].split() == ["kind", "family", "selected_by", "in_use", "parameters"]
    assert "segmenter.arch=segformer" in table[4] and f"{rows[3]['parameters']:,}" in table[4]
