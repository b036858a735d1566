"""Shard writing, the manifest, determinism and verification."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import config
from pipeline.data.prepare import prepare_dataset, shard_ranges
from pipeline.data.shards import (
    MANIFEST,
    decode_block,
    decode_png,
    load_manifest,
    npy_bytes,
    tar_samples,
    verify_shards,
)
from pipeline.data.sources import SPLITS
from pipeline.errors import UserError
from tests.conftest import TINY, write_params


def _build(factory: pytest.TempPathFactory, encoding: str) -> Path:
    base = factory.mktemp(encoding)
    prepare_dataset(config.load(write_params(base, {"data.encoding": encoding})), base / "shards", progress=False)
    return base / "shards"


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset in the png encoding (these tests read its PNG members)."""
    return _build(tmp_path_factory, "png")


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same dataset in the raw encoding."""
    return _build(tmp_path_factory, "raw")


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _plain_tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name for m in tar.getmembers()]


@pytest.mark.parametrize(("encoding", "workers"), [("png", 1), ("png", 2), ("raw", 1), ("raw", 2)])
def test_prepare_is_byte_identical_at_any_worker_count_and_removes_stale_shards(
    tiny_shards: Path, raw_shards: Path, tiny_params, tmp_path: Path, encoding: str, workers: int
) -> None:
    out = tmp_path / "again"
    stale = out / "patches" / "train-000099.tar"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left over from a previous run")
    prepare_dataset(config.load(tiny_params({"data.encoding": encoding, "data.workers": workers})), out, progress=False)
    assert not stale.exists()
    assert _digests(out) == _digests(tiny_shards if encoding == "png" else raw_shards)  # the temp stores are gone
    assert len(_digests(out)) > 10


def test_encodings_differ_only_in_their_members(tiny_shards: Path, raw_shards: Path) -> None:
    png, raw = load_manifest(tiny_shards), load_manifest(raw_shards)
    assert (png["encoding"], raw["encoding"]) == ("png", "raw")
    for key in ("classes", "sources", "skipped", "seed"):
        assert png[key] == raw[key]
    assert {k: v for k, v in png["params"].items() if k != "encoding"} == {
        k: v for k, v in raw["params"].items() if k != "encoding"
    }
    for split in SPLITS:
        for kind in ("patches", "mosaics"):
            png_shards, raw_shards_ = png["splits"][split][kind]["shards"], raw["splits"][split][kind]["shards"]
            assert [(s["file"], s["samples"]) for s in png_shards] == [(s["file"], s["samples"]) for s in raw_shards_]
            for a, b in zip(png_shards, raw_shards_, strict=True):
                samples = list(tar_samples(tiny_shards / a["file"]))
                (block,) = tar_samples(raw_shards / b["file"])
                images, targets, keys = decode_block(block, kind)
                assert keys == [s["__key__"] for s in samples] and block["__key__"] == keys[0][:6]
                assert np.array_equal(images, np.stack([decode_png(s["png"], "RGB") for s in samples]))
                if kind == "patches":
                    assert targets.tolist() == [int(s["cls"]) for s in samples]
                else:
                    assert np.array_equal(targets, np.stack([decode_png(s["mask.png"], "L") for s in samples]))
                    assert json.loads(block["info.json"]) == [json.loads(s["json"]) for s in samples]


def test_manifest_shape_and_params(tiny_shards: Path, tiny_cfg) -> None:
    manifest = load_manifest(tiny_shards)
    assert manifest["classes"] == TINY["data.classes"]
    expected = {k: v for k, v in config.to_dict(tiny_cfg.data).items() if k != "workers"}  # not a shard property
    assert manifest["params"] == expected | {"encoding": "png"}
    assert manifest["encoding"] == "png"
    assert manifest["skipped"] == []
    assert set(manifest["splits"]) == set(SPLITS)
    for split in SPLITS:
        assert set(manifest["splits"][split]) == {"patches", "mosaics"}
        assert manifest["splits"][split]["mosaics"]["samples"] == TINY["data.mosaics"][split]
        n_sources = len(manifest["sources"][split])
        assert manifest["splits"][split]["patches"]["samples"] == n_sources * TINY["data.patches_per_source"]


def test_manifest_counts_and_hashes_match_tar_contents(tiny_shards: Path) -> None:
    manifest = load_manifest(tiny_shards)
    on_disk = set()
    for split, kinds in manifest["splits"].items():
        for kind, group in kinds.items():
            shards = group["shards"]
            sizes = [s["samples"] for s in shards]
            assert len(shards) >= TINY["data.min_shards"]
            assert max(sizes) <= TINY["data.shard_max_samples"] and max(sizes) - min(sizes) <= 1
            assert sum(sizes) == group["samples"]
            for j, shard in enumerate(shards):
                path = tiny_shards / shard["file"]
                assert shard["file"] == f"{kind}/{split}-{j:06d}.tar"
                assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
                names = _plain_tar_members(path)
                keys = sorted({n.split(".", 1)[0] for n in names})
                exts = ("cls", "png") if kind == "patches" else ("json", "mask.png", "png")
                assert names == [f"{k}.{e}" for k in keys for e in exts]
                assert len(keys) == shard["samples"]
                on_disk.add(path)
    assert on_disk == set(tiny_shards.glob("*/*.tar"))


def test_splits_are_disjoint_by_source_and_samples_stay_in_their_split(tiny_shards: Path) -> None:
    manifest = load_manifest(tiny_shards)
    sources = {split: set(manifest["sources"][split]) for split in SPLITS}
    assert not (sources["train"] & sources["val"]) and not (sources["train"] & sources["test"])
    assert not sources["val"] & sources["test"]
    classes = manifest["classes"]
    for split in SPLITS:
        safe = {s.replace("/", "_"): s for s in sources[split]}
        for shard in manifest["splits"][split]["patches"]["shards"]:
            labels = set()
            for sample in tar_samples(tiny_shards / shard["file"]):
                source = "_".join(sample["__key__"].split("_")[1:-1])
                assert source in safe, (split, sample["__key__"])
                assert classes[int(sample["cls"])] == safe[source].split("/")[0]
                labels.add(int(sample["cls"]))
            if split == "train":
                assert len(labels) > 1, "patch order is not shuffled across sources"
        for shard in manifest["splits"][split]["mosaics"]["shards"]:
            for sample in tar_samples(tiny_shards / shard["file"]):
                info = json.loads(sample["json"])
                assert set(info["sources"]) <= sources[split]
                mask = decode_png(sample["mask.png"], "L")
                assert set(np.unique(mask).tolist()) == {classes.index(s.split("/")[0]) for s in info["sources"]}
                assert decode_png(sample["png"], "RGB").shape == (*mask.shape, 3)


def test_shard_ranges_spread_samples_evenly() -> None:
    assert shard_ranges(10, 8, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert shard_ranges(17, 8, 2) == [(0, 5), (5, 11), (11, 17)]
    assert shard_ranges(4, 100, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_too_few_samples_for_min_shards_is_an_error(tiny_params, tmp_path: Path) -> None:
    cfg = config.load(tiny_params({"data.min_shards": 25, "train.nproc_per_node": 1}))
    with pytest.raises(UserError, match=r"data.min_shards: split 'val' has 20 mosaics sample\(s\), fewer than"):
        prepare_dataset(cfg, tmp_path / "out", progress=False)


def test_single_class_cannot_make_mosaics(tiny_params, tmp_path: Path) -> None:
    cfg = config.load(tiny_params({"data.classes": ["dots"]}))
    with pytest.raises(UserError, match=r"data.classes: mosaics need at least 2 classes"):
        prepare_dataset(cfg, tmp_path / "out", progress=False)


def test_load_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"{tmp_path / MANIFEST}: manifest not found"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match=rf"{tmp_path / MANIFEST}: invalid manifest"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"classes": []}))
    with pytest.raises(UserError, match=r"invalid manifest \(missing encoding, splits, params, sources, skipped\)"):
        load_manifest(tmp_path)


def test_verify_shards_passes_on_good_data(tiny_shards: Path, raw_shards: Path) -> None:
    assert verify_shards(tiny_shards) == []
    assert verify_shards(raw_shards) == []


def _rewrite_block(path: Path, **members: bytes) -> None:
    """Replace members of a raw shard's block (the tar rewritten as prepare writes it)."""
    import webdataset as wds

    (block,) = tar_samples(path)
    with wds.TarWriter(str(path), mtime=0) as writer:
        writer.write(block | members)


def test_verify_shards_names_broken_raw_blocks(raw_shards: Path, tmp_path: Path) -> None:
    data = tmp_path / "shards"
    shutil.copytree(raw_shards, data)
    label, shape, count = (data / "patches" / f"train-{j:06d}.tar" for j in range(3))
    (block,) = tar_samples(label)
    labels = np.frombuffer(block["labels.npy"][128:], np.int64).copy()
    labels[0] = 99
    _rewrite_block(label, **{"labels.npy": npy_bytes(labels)})
    _rewrite_block(shape, **{"images.npy": npy_bytes(np.zeros((8, 8, 8, 3), np.uint8))})
    (block,) = tar_samples(count)
    _rewrite_block(count, **{"keys.json": b"[]"})
    mask = data / "mosaics" / "val-000000.tar"
    _rewrite_block(mask, **{"masks.npy": b"not an array"})

    problems = verify_shards(data)
    text = "\n".join(problems)
    assert f"{label}: sample 000000: class index out of range" in problems
    assert f"{shape}: sample " in text and "images are 8px, expected 16px" in text
    assert f"{count}: sample " in text and "keys.json does not hold 8 keys" in text
    assert f"{mask}: sample 000000: " in text
    assert all("\n" not in p for p in problems)


def test_verify_shards_names_every_broken_file(tiny_shards: Path, tmp_path: Path) -> None:
    data = tmp_path / "shards"
    shutil.copytree(tiny_shards, data)
    truncated, flipped, missing = (data / "patches" / f"train-{j:06d}.tar" for j in range(3))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    blob = bytearray(flipped.read_bytes())
    start = blob.index(b"IDAT") + 8
    blob[start : start + 16] = bytes(16)  # same size, image data destroyed
    flipped.write_bytes(bytes(blob))
    missing.unlink()
    (data / "mosaics" / "extra-000000.tar").write_bytes(b"")

    problems = verify_shards(data)
    text = "\n".join(problems)
    assert f"{truncated}: sha256 differs" in text and f"{truncated}: unreadable tar" in text
    assert f"{flipped}: sha256 differs" in text
    assert any(p.startswith(f"{flipped}: sample ") for p in problems)
    assert f"{missing}: missing" in problems
    assert f"{data / 'mosaics' / 'extra-000000.tar'}: not listed in the manifest" in problems
    assert all("\n" not in p for p in problems)
