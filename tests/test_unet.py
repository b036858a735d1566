"""U-Net segmenter: shapes for every option, the documented widths, test-time views, save/load, SyncBN conversion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.checkpoint import CheckpointError
from pipeline.distributed import SyncBatchNorm2d, convert_sync_batchnorm
from pipeline.models.blocks import ASPP
from pipeline.models.segmenter_base import TTA_VIEWS
from pipeline.models.segmenters import load_segmenter, save_segmenter
from pipeline.models.unet import UNet


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": 8, "depth": 1},
        {"channels": 8, "depth": 3, "upsample": "bilinear"},
        {"channels": 8, "depth": 3, "upsample": "transpose"},
        {"channels": 4, "depth": 5, "dropout": 0.3},
        {"channels": 8, "depth": 3, "dilated_bottleneck": True},
        {"channels": 8, "depth": 2, "upsample": "transpose", "dilated_bottleneck": True},
        {"channels": 8, "depth": 4, "decoder": "add"},
        {"channels": 8, "depth": 3, "upsample": "transpose", "decoder": "add"},
    ],
)
@pytest.mark.parametrize("size", [(32, 32), (37, 50), (5, 9)])
def test_logits_have_the_input_size_for_every_option(kwargs: dict, size: tuple[int, int]) -> None:
    model = UNet(num_classes=4, **kwargs)
    logits = model(torch.rand(2, 3, *size))
    assert logits.shape == (2, 4, *size)
    assert torch.isfinite(logits).all()


def test_widths_double_per_level_and_match_the_reference_size() -> None:
    """channels=16, depth=3: 16/32 encoder, 64 bottleneck at 1/4 resolution (the ~118k-parameter reference net)."""
    model = UNet(num_classes=8, channels=16, depth=3)
    convs = [m for m in model.down.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32]
    assert [m.out_channels for m in model.bottleneck.modules() if isinstance(m, nn.Conv2d)] == [64, 64]
    shapes = []
    model.bottleneck.register_forward_hook(lambda mod, inp, out: shapes.append(out.shape))
    model(torch.rand(1, 3, 64, 64))
    assert shapes == [(1, 64, 16, 16)]
    assert 110_000 < sum(p.numel() for p in model.parameters()) < 125_000
    atrous = UNet(num_classes=8, channels=16, depth=3, dilated_bottleneck=True)
    assert isinstance(atrous.bottleneck, ASPP)
    dilations = {m.dilation for m in atrous.bottleneck.modules() if isinstance(m, nn.Conv2d)}
    assert {(2, 2), (4, 4), (6, 6)} <= dilations


def test_add_decoder_merges_by_addition_at_a_fraction_of_the_cost() -> None:
    """LinkNet merge: each level adds the projected deeper map to the skip and runs one 3x3 conv.

    Its decoder does under 40% of the multiply-adds of the concatenating one on the same encoder.
    """
    macs: dict[str, int] = {}

    def count(name: str) -> Callable[[nn.Conv2d, tuple, torch.Tensor], None]:
        def hook(mod: nn.Conv2d, inp: tuple, out: torch.Tensor) -> None:
            macs[name] += out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] // mod.groups

        return hook

    for decoder in ("concat", "add"):
        model = UNet(num_classes=8, channels=16, depth=3, decoder=decoder)
        macs[decoder] = 0
        for m in model.up.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(count(decoder))
        model(torch.rand(1, 3, 64, 64))
        if decoder == "add":
            level = model.up[-1]  # full resolution: 32 -> 16 projection, then one 16 -> 16 conv
            assert [c.kernel_size for c in level.modules() if isinstance(c, nn.Conv2d)] == [(1, 1), (3, 3)]
            assert level.conv[0].in_channels == level.conv[0].out_channels == 16
    assert macs["add"] < 0.4 * macs["concat"]


def test_dropout_is_active_in_training_only() -> None:
    model = UNet(num_classes=3, channels=4, depth=2, dropout=0.5)
    x = torch.rand(2, 3, 16, 16)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    model = UNet(num_classes=5, channels=8, depth=3).eval()
    x = torch.rand(2, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def _trained_bn(model: UNet) -> UNet:
    """``model`` in eval mode with BatchNorm statistics moved off their defaults by one training forward."""
    model.train()
    model(torch.rand(4, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("size", [(24, 24), (20, 28)])  # square, and not a multiple of the pooling (padded)
def test_d8_views_make_predictions_follow_turns_and_flips(size: tuple[int, int]) -> None:
    """Averaged over the dihedral group, the prediction of a turned/flipped image is the turned/flipped prediction.

    A single view has no such symmetry (checked too), so this holds only if every view is undone correctly.
    """
    torch.manual_seed(0)
    model = _trained_bn(UNet(num_classes=4, channels=8, depth=3, decoder="add", tta="d8"))
    x = torch.rand(2, 3, *size)
    out = model(x)
    assert out.shape == (2, 4, *size)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, *size))  # log-probabilities
    for move in (lambda t: t.rot90(1, (2, 3)), lambda t: t.flip(3), lambda t: t.flip(2).rot90(3, (2, 3))):
        torch.testing.assert_close(model(move(x)), move(out), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.logits(x.flip(3)), model.logits(x).flip(3), atol=1e-3)


def test_flip_views_follow_flips() -> None:
    torch.manual_seed(0)
    model = _trained_bn(UNet(num_classes=3, channels=8, depth=2, tta="flip"))
    x = torch.rand(1, 3, 16, 20)
    out = model(x)
    for move in (lambda t: t.flip(3), lambda t: t.flip(2), lambda t: t.flip(2, 3)):
        torch.testing.assert_close(model(move(x)), move(out), atol=1e-5, rtol=1e-5)
    assert len(TTA_VIEWS["flip"]) == 4 and len(TTA_VIEWS["d8"]) == 8 == len(set(TTA_VIEWS["d8"]))


def test_training_and_tta_none_see_one_view() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    plain = _trained_bn(UNet(num_classes=3, channels=4, depth=2))
    assert torch.equal(plain(x), plain.logits(x))
    d8 = UNet(num_classes=3, channels=4, depth=2, tta="d8")
    d8.load_state_dict(plain.state_dict())
    d8.eval()
    assert not torch.allclose(d8(x), plain(x))
    d8.train()
    torch.manual_seed(1)
    a = d8(x)
    plain.train()
    torch.manual_seed(1)
    assert torch.equal(a, plain(x))  # train mode: one view, the same computation as without tta


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="upsample"):
        UNet(num_classes=3, upsample="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decoder"):
        UNet(num_classes=3, decoder="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tta"):
        UNet(num_classes=3, tta="d4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        UNet(num_classes=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        UNet(num_classes=3, channels=4, depth=2)(torch.rand(1, 1, 8, 8))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UNet(
        num_classes=4,
        channels=8,
        depth=3,
        upsample="transpose",
        dropout=0.1,
        dilated_bottleneck=True,
        decoder="add",
        tta="flip",
    )
    model.train()
    model(torch.rand(4, 3, 32, 32))  # move the BatchNorm running statistics off their defaults
    model.eval()
    meta = {"classes": ["a", "b", "c", "d"], "run_id": "abc", "val_miou": 0.5}
    path = tmp_path / "model.pt"
    save_segmenter(path, model, meta)
    loaded, loaded_meta = load_segmenter(path)
    assert loaded_meta == meta
    assert loaded.kwargs == model.kwargs and not loaded.training
    x = torch.rand(2, 3, 24, 24)
    assert torch.equal(loaded(x), model(x))
    torch.load(path, weights_only=True)  # plain tensors and python types only


def test_converted_model_saves_and_loads_as_a_plain_unet(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UNet(num_classes=3, channels=4, depth=2)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert sum(isinstance(m, SyncBatchNorm2d) for m in converted.modules()) == 6
    assert converted.state_dict().keys() == reference.keys()
    save_segmenter(tmp_path / "m.pt", converted, {"classes": ["a", "b", "c"]})
    loaded, _ = load_segmenter(tmp_path / "m.pt")
    assert all(type(m) is not SyncBatchNorm2d for m in loaded.modules())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_sync_batchnorm_without_process_group_is_batchnorm() -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(6)
    sync = SyncBatchNorm2d(6)
    x = torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)


def test_load_rejects_files_that_are_not_segmenters(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.pt"):
        load_segmenter(bad)
    other = tmp_path / "other.pt"
    torch.save({"kwargs": {"num_classes": 3}, "state_dict": {"x": torch.zeros(1)}, "meta": {}}, other)
    with pytest.raises(CheckpointError, match="not a segmenter model file"):
        load_segmenter(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_segmenter(tmp_path / "missing.pt")
