"""WebDataset loaders: fixed-length deterministic training streams, exact evaluation, shard errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.data.loaders import eval_batches, train_batches
from pipeline.data.shards import decode_png, load_manifest, tar_samples
from pipeline.errors import UserError


def _train(shards: Path, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    args = {"kind": "patches", "split": "train", "batch_size": 8, "batches_per_epoch": 5}
    args |= {"rank": 0, "world_size": 1, "num_workers": 0, "seed": 3, "epoch": 0} | kw
    return list(
        train_batches(
            shards,
            args.pop("kind"),
            args.pop("split"),
            args.pop("batch_size"),
            args.pop("batches_per_epoch"),
            **args,
        )
    )


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) and torch.equal(s, t) for (x, s), (y, t) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("num_workers", [0, 1])
def test_every_rank_gets_the_same_number_of_full_batches(tiny_shards: Path, num_workers: int) -> None:
    # 16 train patch shards of 8 samples; 7 batches of 8 per rank is more than a rank's shards hold once
    per_rank = [
        _train(tiny_shards, rank=r, world_size=2, num_workers=num_workers, batches_per_epoch=7) for r in range(2)
    ]
    for batches in per_rank:
        assert len(batches) == 7
        for images, labels in batches:
            assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
            assert labels.shape == (8,) and labels.dtype == torch.int64
            assert images.min() >= 0.0 and images.max() <= 1.0 and labels.max() < 4
    assert not _same(per_rank[0], per_rank[1])


def test_mosaic_batches_have_masks(tiny_shards: Path) -> None:
    batches = _train(tiny_shards, kind="mosaics", batch_size=4, batches_per_epoch=3, rank=1, world_size=2)
    assert len(batches) == 3
    for images, masks in batches:
        assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32) and masks.dtype == torch.int64
        assert masks.max() < 4


def test_train_batches_are_deterministic_and_resumable(tiny_shards: Path) -> None:
    straight = _train(tiny_shards, epoch=2, rank=1, world_size=2)
    assert _same(straight, _train(tiny_shards, epoch=2, rank=1, world_size=2))
    resumed = iter(
        train_batches(tiny_shards, "patches", "train", 8, 5, rank=1, world_size=2, num_workers=0, seed=3, epoch=2)
    )
    for _ in range(2):
        next(resumed)
    assert _same(straight[2:], list(resumed))
    assert not _same(straight, _train(tiny_shards, epoch=3, rank=1, world_size=2))
    assert not _same(straight, _train(tiny_shards, epoch=2, rank=1, world_size=2, seed=4))


def test_workers_are_deterministic_and_leave_the_global_rng_alone(tiny_shards: Path) -> None:
    state = torch.get_rng_state()
    first = _train(tiny_shards, num_workers=1, batches_per_epoch=3)
    assert torch.equal(state, torch.get_rng_state())
    assert _same(first, _train(tiny_shards, num_workers=1, batches_per_epoch=3))


def _all_mosaics(shards: Path, split: str) -> list[bytes]:
    manifest = load_manifest(shards)
    images = []
    for shard in manifest["splits"][split]["mosaics"]["shards"]:
        for sample in tar_samples(shards / shard["file"]):
            rgb = torch.from_numpy(decode_png(sample["png"], "RGB")).permute(2, 0, 1).float().div(255.0)
            images.append(rgb.numpy().tobytes())
    return images


def test_eval_sees_every_sample_exactly_once_over_two_ranks(tiny_shards: Path) -> None:
    expected = _all_mosaics(tiny_shards, "test")
    assert len(expected) == 21  # not divisible by the 2 ranks
    seen = []
    for rank in range(2):
        batches = list(eval_batches(tiny_shards, "mosaics", "test", 4, rank=rank, world_size=2))
        assert [len(b[0]) for b in batches] == ([4, 4, 3] if rank == 0 else [4, 4, 2])
        for images, masks in batches:
            assert masks.shape == (len(images), 32, 32)
            seen += [image.numpy().tobytes() for image in images]
    assert sorted(seen) == sorted(expected)
    # rank r takes samples i % 2 == r in manifest order
    rank1 = [
        im.numpy().tobytes()
        for b in eval_batches(tiny_shards, "mosaics", "test", 4, rank=1, world_size=2)
        for im in b[0]
    ]
    assert rank1 == expected[1::2]


def test_unknown_split_or_kind_names_the_manifest(tiny_shards: Path) -> None:
    with pytest.raises(UserError, match=r"manifest.json: no split 'holdout' \(have: .*train.*\)"):
        eval_batches(tiny_shards, "patches", "holdout", 4, rank=0, world_size=1)
    with pytest.raises(UserError, match=r"manifest.json: no kind 'videos'"):
        _train(tiny_shards, kind="videos")


@pytest.fixture
def broken_copy(tiny_shards: Path, tmp_path: Path) -> Path:
    data = tmp_path / "shards"
    shutil.copytree(tiny_shards, data)
    return data


def test_missing_or_truncated_shard_is_a_user_error_naming_it(broken_copy: Path) -> None:
    missing = broken_copy / "mosaics" / "test-000001.tar"
    missing.unlink()
    with pytest.raises(UserError, match=rf"{missing}: shard listed in the manifest is missing"):
        eval_batches(broken_copy, "mosaics", "test", 4, rank=0, world_size=1)
    truncated = broken_copy / "patches" / "train-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(UserError, match=rf"{truncated}: shard has 2000 bytes, the manifest says \d+ \(truncated\?\)"):
        _train(broken_copy)


def _corrupt_images(path: Path) -> None:
    """Destroy the image data of every sample, keeping the file size (so only decoding can notice)."""
    blob = bytearray(path.read_bytes())
    start = 0
    while (start := blob.find(b"IDAT", start)) >= 0:
        blob[start + 8 : start + 24] = bytes(16)
        start += 24
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_shard_is_a_one_line_user_error_naming_it(broken_copy: Path, num_workers: int) -> None:
    manifest = load_manifest(broken_copy)
    shards = [broken_copy / s["file"] for s in manifest["splits"]["train"]["patches"]["shards"]]
    for path in shards:
        _corrupt_images(path)
    with pytest.raises(UserError) as info:
        _train(broken_copy, num_workers=num_workers)
    message = str(info.value)
    assert "\n" not in message and ": cannot decode (" in message
    assert any(message.startswith(f"{path}: sample ") for path in shards), message


def test_garbage_shard_in_eval_is_a_user_error_naming_it(broken_copy: Path) -> None:
    garbage = broken_copy / "mosaics" / "val-000000.tar"
    garbage.write_bytes(b"\x01" * garbage.stat().st_size)
    with pytest.raises(UserError, match=rf"{garbage}: cannot read shard"):
        list(eval_batches(broken_copy, "mosaics", "val", 4, rank=0, world_size=1))
