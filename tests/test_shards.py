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
from pipeline.data.shards import (
    MANIFEST,
    decode_png,
    load_manifest,
    prepare_dataset,
    shard_ranges,
    tar_samples,
    verify_shards,
)
from pipeline.data.sources import SPLITS
from pipeline.errors import UserError
from tests.conftest import TINY


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _plain_tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name for m in tar.getmembers()]


def test_prepare_is_byte_identical_and_removes_stale_shards(tiny_shards: Path, tiny_cfg, tmp_path: Path) -> None:
    out = tmp_path / "again"
    stale = out / "patches" / "train-000099.tar"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left over from a previous run")
    prepare_dataset(tiny_cfg, out, progress=False)
    assert not stale.exists()
    assert _digests(out) == _digests(tiny_shards)
    assert len(_digests(out)) > 10


def test_manifest_shape_and_params(tiny_shards: Path, tiny_cfg) -> None:
    manifest = load_manifest(tiny_shards)
    assert manifest["classes"] == TINY["data.classes"]
    assert manifest["params"] == config.to_dict(tiny_cfg.data)
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
    with pytest.raises(UserError, match=r"invalid manifest \(missing splits, params, sources, skipped\)"):
        load_manifest(tmp_path)


def test_verify_shards_passes_on_good_data(tiny_shards: Path) -> None:
    assert verify_shards(tiny_shards) == []


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
