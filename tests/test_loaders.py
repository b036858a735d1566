"""WebDataset loaders: fixed-length deterministic training streams, exact evaluation, shard errors."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline import config
from pipeline.data.loaders import (
    RankShards,
    _expand,
    _plain_members,
    _Shards,
    _shuffle,
    decode_batch,
    eval_batches,
    train_batches,
    train_stream,
)
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import ShardError, load_manifest, tar_samples
from pipeline.errors import UserError
from pipeline.images import decode_png
from pipeline.images import png_bytes as encode_png
from tests.conftest import write_params


def _build(factory: pytest.TempPathFactory, encoding: str) -> Path:
    base = factory.mktemp(encoding)
    prepare_dataset(config.load(write_params(base, {"data.encoding": encoding})), base / "shards", progress=False)
    return base / "shards"


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset in the png encoding (most tests here read or damage its PNG members)."""
    return _build(tmp_path_factory, "png")


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same dataset in the raw encoding."""
    return _build(tmp_path_factory, "raw")


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


def test_train_stream_runs_epoch_after_epoch_and_resumes_mid_epoch(tiny_shards: Path) -> None:
    def stream(start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = train_stream(tiny_shards, "patches", 8, 3, rank=1, world_size=2, num_workers=0, seed=3, start=start)
        return [next(batches) for _ in range(7 - start)]

    straight = stream(0)
    epochs = [_train(tiny_shards, epoch=e, rank=1, world_size=2, batches_per_epoch=3) for e in range(3)]
    assert _same(straight, [b for epoch in epochs for b in epoch][:7])
    assert _same(straight[4:], stream(4))  # resumed inside the second epoch


@pytest.mark.parametrize("num_workers", [0, 1])
def test_both_encodings_give_the_same_training_batches(tiny_shards: Path, raw_shards: Path, num_workers: int) -> None:
    for kind in ("patches", "mosaics"):
        args = {"kind": kind, "rank": 1, "world_size": 2, "num_workers": num_workers, "batches_per_epoch": 7}
        png, raw = _train(tiny_shards, **args), _train(raw_shards, **args)
        assert len(png) == 7 and _same(png, raw)
        assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in raw)
    stream = partial(train_stream, kind="patches", batch_size=8, batches_per_epoch=3, rank=0, world_size=1)
    png = list(islice(stream(tiny_shards, num_workers=num_workers, seed=5, start=2), 5))
    assert _same(png, list(islice(stream(raw_shards, num_workers=num_workers, seed=5, start=2), 5)))


@pytest.mark.parametrize(("kind", "split"), [("patches", "test"), ("mosaics", "val")])
def test_both_encodings_give_the_same_eval_batches(tiny_shards: Path, raw_shards: Path, kind: str, split: str) -> None:
    for rank in range(2):
        png = list(eval_batches(tiny_shards, kind, split, 4, rank=rank, world_size=2))
        assert len(png) > 1 and _same(png, list(eval_batches(raw_shards, kind, split, 4, rank=rank, world_size=2)))


def test_a_raw_block_of_the_wrong_size_is_a_user_error_naming_it(raw_shards: Path, tmp_path: Path) -> None:
    from pipeline.data.shards import npy_bytes

    data = tmp_path / "shards"
    shutil.copytree(raw_shards, data)
    shard = data / load_manifest(data)["splits"]["val"]["mosaics"]["shards"][0]["file"]
    (block,) = tar_samples(shard)
    # 20 mosaics of 16px instead of 5 of 32px: the same bytes, so only the decoded block can tell
    block["images.npy"] = npy_bytes(np.zeros((20, 16, 16, 3), np.uint8))
    block["masks.npy"] = npy_bytes(np.zeros((20, 16, 16), np.uint8))
    block["keys.json"] = json.dumps([f"{i:06d}" for i in range(20)])
    with wds.TarWriter(str(shard), mtime=0) as writer:
        writer.write(block)
    with pytest.raises(UserError, match=rf"^{shard}: block 000000: cannot decode \(images are 16px, the manifest"):
        list(eval_batches(data, "mosaics", "val", 4, rank=0, world_size=1))


def test_pinned_batches_need_a_cuda_device_and_equal_the_plain_ones(raw_shards: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs CUDA")
    pinned = _train(raw_shards, pin_memory=True)
    assert all(x.is_pinned() and y.is_pinned() for x, y in pinned) and _same(pinned, _train(raw_shards))


def test_workers_are_deterministic_and_leave_the_global_rng_alone(tiny_shards: Path) -> None:
    state = torch.get_rng_state()
    first = _train(tiny_shards, num_workers=1, batches_per_epoch=3)
    assert torch.equal(state, torch.get_rng_state())
    assert _same(first, _train(tiny_shards, num_workers=1, batches_per_epoch=3))


def _stock_collate(samples: list[dict], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """webdataset's plain samples -> a batch the textbook way: per-sample decode, stack, torch conversion."""
    images = np.stack([decode_png(s["png"], "RGB") for s in samples])
    if kind == "patches":
        targets = np.asarray([int(s["cls"]) for s in samples], dtype=np.int64)
    else:
        targets = np.stack([decode_png(s["mask.png"], "L") for s in samples]).astype(np.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float().div_(255.0), torch.from_numpy(targets)


@pytest.mark.parametrize(("kind", "rank", "world_size"), [("patches", 0, 1), ("patches", 1, 2), ("mosaics", 0, 2)])
def test_train_batches_equal_webdatasets_stock_pipeline(
    tiny_shards: Path, kind: str, rank: int, world_size: int
) -> None:
    # same shard draws and shuffle seeds, but webdataset's own tar reader and per-sample decoding: the fast
    # reader, the batch decoder and the float conversion must not change a bit of any batch
    seed, epoch, batch_size, batches = 7, 1, 8, 6
    urls = [str(tiny_shards / s["file"]) for s in load_manifest(tiny_shards)["splits"]["train"][kind]["shards"]]
    stock = wds.DataPipeline(
        RankShards(urls, rank, world_size, seed, epoch),
        wds.tarfile_to_samples(),
        partial(_shuffle, seed=seed, rank=rank, world_size=world_size, epoch=epoch),
        wds.batched(batch_size, collation_fn=partial(_stock_collate, kind=kind), partial=False),
    )
    expected = list(islice(stock, batches))
    ours = _train(
        tiny_shards, kind=kind, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
        batch_size=batch_size, batches_per_epoch=batches,
    )  # fmt: skip
    assert len(expected) == batches and _same(ours, expected)


def _rewrite(samples: list[dict], path: Path, key: str) -> list[dict]:
    """Write ``samples`` under new keys (``key`` + index) with webdataset's TarWriter; returns what was written."""
    renamed = [
        {"__key__": f"{key}{i:03d}", **{k: v for k, v in s.items() if not k.startswith("__")}}
        for i, s in enumerate(samples)
    ]
    with wds.TarWriter(str(path), mtime=0) as writer:
        for sample in renamed:
            writer.write(sample)
    return renamed


def test_any_tar_reads_like_a_plain_shard(tiny_shards: Path, tmp_path: Path) -> None:
    shard = tiny_shards / load_manifest(tiny_shards)["splits"]["val"]["mosaics"]["shards"][0]["file"]
    assert _plain_members(shard.read_bytes()) is not None  # our shards take the fast path
    originals = list(tar_samples(shard))
    plain, long_names, gzipped = tmp_path / "plain.tar", tmp_path / "long.tar", tmp_path / "gz.tar"
    cases = {
        plain: _rewrite(originals, plain, "k"),
        long_names: _rewrite(originals, long_names, "k" * 120),  # > 100 characters: pax headers
    }
    gzipped.write_bytes(gzip.compress(plain.read_bytes()))
    cases[gzipped] = cases[plain]
    assert _plain_members(long_names.read_bytes()) is None and _plain_members(gzipped.read_bytes()) is None
    for path, written in cases.items():
        url = str(path)
        got = list(_expand([{"url": url}], _Shards([url], {url: {"samples": len(written)}}, "mosaics", "png", 32)))
        assert got == [{"__url__": url, **sample} for sample in written]


def test_a_damaged_member_header_is_a_user_error_naming_the_shard(broken_copy: Path) -> None:
    shard = broken_copy / load_manifest(broken_copy)["splits"]["train"]["patches"]["shards"][0]["file"]
    blob = bytearray(shard.read_bytes())
    header = blob.index(b"ustar", 3 * 512) - 257  # the header of some member after the first
    blob[header + 140] ^= 0x01  # one bit of its mtime: only the header checksum can tell
    shard.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=rf"^{shard}: \d+ samples, the manifest says 8$"):
        list(eval_batches(broken_copy, "patches", "train", 8, rank=0, world_size=1))


def test_decode_batch_names_a_sample_of_another_size() -> None:
    def sample(key: str, side: int) -> dict:
        image = np.zeros((side, side, 3), np.uint8)
        return {"__key__": key, "__url__": "some.tar", "png": encode_png(image), "cls": b"1"}

    images, labels = decode_batch([sample("a", 8), sample("b", 8)], "patches")
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [1, 1]
    with pytest.raises(ShardError, match=r"^some\.tar: sample c: image is \(4, 4\), the batch's first is \(8, 8\)$"):
        decode_batch([sample("a", 8), sample("c", 4)], "patches")


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


def test_abandoned_loader_stops_its_workers(tiny_shards: Path) -> None:
    """Workers sit in their own process group (a group SIGTERM is the trainer's), yet a DataLoader dropped
    mid-epoch still stops them: nothing is left for the interpreter to wait on at exit."""
    import multiprocessing

    earlier = {w.pid for w in multiprocessing.active_children()}  # other tests' children are not this loader's
    batches = iter(
        train_batches(tiny_shards, "patches", "train", 4, 50, rank=0, world_size=1, num_workers=2, seed=0, epoch=0)
    )
    next(batches)
    workers = [w for w in multiprocessing.active_children() if w.pid not in earlier]
    assert len(workers) == 2, workers
    assert all(os.getpgid(w.pid) == w.pid for w in workers), workers  # each leads its own group
    del batches
    for w in workers:
        w.join(timeout=30)
    assert not [w for w in workers if w.is_alive()]
