"""Texture sources, splits, the folder source, augmentation and mosaics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.config import AugmentConfig
from pipeline.data.mosaics import MIN_REGION_FRACTION, augment, compose, make_mosaic, region_layout
from pipeline.data.prepare import prepare_dataset
from pipeline.data.sources import BUILTIN_CLASSES, SPLITS, SourceImage, load_sources, rng_for, split_counts
from pipeline.errors import UserError

NO_AUG = AugmentConfig(flip=False, rot90=False, color_jitter=0.0)


def test_builtin_classes_are_the_contract_order() -> None:
    assert BUILTIN_CLASSES == (
        "stripes", "checker", "dots", "noise", "cells", "wood", "weave", "brick", "grass", "gravel",
    )  # fmt: skip


def test_every_builtin_class_makes_distinct_rgb_instances(tiny_params) -> None:
    cfg = config.load(tiny_params({"data.classes": [], "data.instances_per_class": 3}))
    sources = load_sources(cfg.data, cfg.seed)
    assert sources.classes == BUILTIN_CLASSES
    everything = [s for split in SPLITS for s in sources.splits[split]]
    assert len(everything) == 3 * len(BUILTIN_CLASSES)
    for s in everything:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.image.std() > 5, f"{s.id} is almost flat"
        assert s.id.startswith(BUILTIN_CLASSES[s.label] + "/")
    by_class: dict[int, list[SourceImage]] = {}
    for s in everything:
        by_class.setdefault(s.label, []).append(s)
    for label, items in by_class.items():
        assert not np.array_equal(items[0].image, items[1].image), BUILTIN_CLASSES[label]


def test_sources_deterministic_and_independent_of_other_classes(tiny_params) -> None:
    both = config.load(tiny_params({"data.classes": ["stripes", "brick"]}))
    alone = config.load(tiny_params({"data.classes": ["brick"]}))
    a, b, c = load_sources(both.data, 7), load_sources(both.data, 7), load_sources(alone.data, 7)
    for split in SPLITS:
        assert [s.id for s in a.splits[split]] == [s.id for s in b.splits[split]]
        assert all(np.array_equal(x.image, y.image) for x, y in zip(a.splits[split], b.splits[split], strict=True))
        bricks = [s for s in a.splits[split] if s.id.startswith("brick/")]
        assert [s.id for s in bricks] == [s.id for s in c.splits[split]]
        assert all(np.array_equal(x.image, y.image) for x, y in zip(bricks, c.splits[split], strict=True))
    other_seed = load_sources(both.data, 8)
    assert not np.array_equal(a.splits["train"][0].image, other_seed.splits["train"][0].image)


def test_splits_partition_each_class_by_instance(tiny_cfg) -> None:
    sources = load_sources(tiny_cfg.data, tiny_cfg.seed)
    ids = {split: {s.id for s in sources.splits[split]} for split in SPLITS}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    n = tiny_cfg.data.instances_per_class
    expected = split_counts(n, tiny_cfg.data.val_fraction, tiny_cfg.data.test_fraction)
    for label, name in enumerate(sources.classes):
        counts = tuple(sum(s.label == label for s in sources.splits[split]) for split in SPLITS)
        assert counts == expected, name
    assert set().union(*ids.values()) == {f"{c}/{k:04d}" for c in sources.classes for k in range(n)}


@pytest.mark.parametrize(
    ("n", "val", "test", "expected"),
    [(3, 0.15, 0.15, (1, 1, 1)), (30, 0.15, 0.15, (22, 4, 4)), (4, 0.45, 0.44, (1, 1, 2)), (10, 0.0, 0.0, (8, 1, 1))],
)
def test_split_counts_give_every_split_an_instance(n: int, val: float, test: float, expected: tuple) -> None:
    assert split_counts(n, val, test) == expected


def test_photo_tiles_are_disjoint_crops_of_the_photo(tiny_params) -> None:
    import skimage.data

    cfg = config.load(tiny_params({"data.classes": ["gravel"], "data.instances_per_class": 4}))
    sources = load_sources(cfg.data, cfg.seed)
    tiles = sorted((s for split in SPLITS for s in sources.splits[split]), key=lambda s: s.id)
    assert [s.id for s in tiles] == [f"gravel/{k:04d}" for k in range(4)]
    # 4 instances -> a 2 x 2 grid: each tile's luminance follows its own quadrant of the photo
    photo = skimage.data.gravel().astype(float)
    quadrants = [photo[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] for r in range(2) for c in range(2)]
    for k, tile in enumerate(tiles):
        lum = np.asarray(Image.fromarray(tile.image).convert("L").resize((256, 256)), dtype=float)
        corr = [abs(np.corrcoef(lum.ravel(), q.ravel())[0, 1]) for q in quadrants]
        assert int(np.argmax(corr)) == k, corr


def test_unknown_class_is_a_clear_error(tiny_params) -> None:
    cfg = config.load(tiny_params({"data.classes": ["stripes", "marble"]}))
    with pytest.raises(UserError, match=r"unknown class 'marble' \(valid: stripes, checker, .*gravel\)"):
        load_sources(cfg.data, cfg.seed)


# ---------------------------------------------------------------- folder source


def _write_tree(root: Path, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        directory = root / "images" / name
        directory.mkdir(parents=True)
        for k in range(count):
            image = Image.fromarray(rng.integers(0, 256, (40 + 7 * k, 56, 3), dtype=np.uint8))
            image.save(directory / (f"{k}.png" if k % 2 else f"{k}.jpg"))


def _folder_cfg(tiny_params, root: Path, **overrides) -> config.Config:
    return config.load(tiny_params({"data.source": "folder", "data.folder": str(root), "data.classes": []} | overrides))


def test_folder_source_skips_bad_files_and_counts_them(tmp_path: Path, tiny_params, capsys) -> None:
    root = tmp_path / "dtd"
    _write_tree(root, {"banded": 4, "bubbly": 3, "cracked": 4})
    (root / "images" / "banded" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (root / "images" / "bubbly" / "notes.txt").write_text("not an image\n")
    manifest = prepare_dataset(_folder_cfg(tiny_params, root), tmp_path / "shards", progress=False)

    assert manifest["classes"] == ["banded", "bubbly", "cracked"]
    skipped = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"broken.png", "notes.txt"}
    assert all(skipped.values())
    warnings = capsys.readouterr().err
    assert "broken.png: skipped" in warnings and "notes.txt: skipped" in warnings
    ids = [i for split in SPLITS for i in manifest["sources"][split]]
    assert len(ids) == 11 and "banded/0.jpg" in ids and "bubbly/notes.txt" not in ids
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["skipped"] == manifest["skipped"]


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_folder_source_prepares_the_same_bytes_in_one_and_two_processes(
    tmp_path: Path, tiny_params, encoding: str
) -> None:
    root = tmp_path / "dtd"
    _write_tree(root, {"banded": 5, "bubbly": 4, "cracked": 4})
    (root / "images" / "bubbly" / "notes.txt").write_text("not an image\n")
    outs = [tmp_path / f"w{w}" for w in (1, 2)]
    for w, out in zip((1, 2), outs, strict=True):
        cfg = _folder_cfg(tiny_params, root, **{"data.workers": w, "data.encoding": encoding})
        manifest = prepare_dataset(cfg, out, progress=False)
        assert [Path(s["file"]).name for s in manifest["skipped"]] == ["notes.txt"]
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file()) and len(files) > 10
    assert all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)


def test_load_sources_through_a_process_pool_equals_in_process(tiny_cfg) -> None:
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:
        pooled = load_sources(tiny_cfg.data, tiny_cfg.seed, pool.imap)
    alone = load_sources(tiny_cfg.data, tiny_cfg.seed)
    for split in SPLITS:
        assert [(s.id, s.label, s.row) for s in pooled.splits[split]] == [
            (s.id, s.label, s.row) for s in alone.splits[split]
        ]
        assert all(
            np.array_equal(a.image, b.image) for a, b in zip(pooled.splits[split], alone.splits[split], strict=True)
        )


def test_folder_images_are_square_rgb_of_source_size(tmp_path: Path, tiny_params) -> None:
    _write_tree(tmp_path, {"a": 3, "b": 3})
    sources = load_sources(_folder_cfg(tiny_params, tmp_path).data, 0)
    for s in (s for split in SPLITS for s in sources.splits[split]):
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8


def test_folder_class_subset_and_unknown_class(tmp_path: Path, tiny_params) -> None:
    _write_tree(tmp_path, {"a": 3, "b": 3, "c": 3})
    sources = load_sources(_folder_cfg(tiny_params, tmp_path, **{"data.classes": ["c", "a"]}).data, 0)
    assert sources.classes == ("c", "a")
    with pytest.raises(UserError, match=r"unknown class 'z' \(valid: a, b, c\)"):
        load_sources(_folder_cfg(tiny_params, tmp_path, **{"data.classes": ["z"]}).data, 0)


def test_folder_empty_class_missing_root_and_too_few_images(tmp_path: Path, tiny_params) -> None:
    _write_tree(tmp_path / "one", {"a": 3})
    (tmp_path / "one" / "images" / "empty").mkdir()
    with pytest.raises(UserError, match=r"images/empty: empty class folder"):
        load_sources(_folder_cfg(tiny_params, tmp_path / "one").data, 0)
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match=r"none: no class sub-folders"):
        load_sources(_folder_cfg(tiny_params, tmp_path / "none").data, 0)
    with pytest.raises(UserError, match=r"missing: no such directory"):
        load_sources(_folder_cfg(tiny_params, tmp_path / "missing").data, 0)
    _write_tree(tmp_path / "few", {"a": 3, "b": 2})
    with pytest.raises(UserError, match=r"images/b: 2 readable image\(s\); need at least 3"):
        load_sources(_folder_cfg(tiny_params, tmp_path / "few").data, 0)


# ---------------------------------------------------------------- augmentation and mosaics


def test_augment_is_deterministic_and_geometry_only_without_jitter() -> None:
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    geometric = AugmentConfig(flip=True, rot90=True, color_jitter=0.0)
    outputs = [augment(rng_for(3, "x", k), image, geometric) for k in range(12)]
    assert all(np.array_equal(o, augment(rng_for(3, "x", k), image, geometric)) for k, o in enumerate(outputs))
    assert all(sorted(o.reshape(-1, 3).tolist()) == sorted(image.reshape(-1, 3).tolist()) for o in outputs)
    assert len({o.tobytes() for o in outputs}) > 1
    assert np.array_equal(augment(rng_for(3, "x", 0), image, NO_AUG), image)
    jittered = augment(rng_for(3, "x", 0), image, AugmentConfig(flip=False, rot90=False, color_jitter=0.5))
    assert jittered.dtype == np.uint8 and not np.array_equal(jittered, image)


def test_compose_aligns_mask_with_regions_exactly() -> None:
    rng = np.random.default_rng(5)
    colours = {3: (255, 0, 0), 7: (0, 255, 0), 1: (0, 0, 255)}
    for _ in range(20):
        layout, _kind = region_layout(rng, 32, 3)
        textures = [np.broadcast_to(np.array(c, np.uint8), (32, 32, 3)) for c in colours.values()]
        image, mask = compose(textures, list(colours), layout)
        for label, colour in colours.items():
            assert np.all((image == colour).all(axis=-1) == (mask == label))
        assert np.bincount(layout.ravel()).min() >= MIN_REGION_FRACTION * 32 * 32


def test_mosaic_uses_distinct_classes_and_exact_crops() -> None:
    rng = np.random.default_rng(2)
    by_class = {
        label: [SourceImage(f"c{label}/{k}", label, np.full((48, 48, 3), 20 * label + k, np.uint8)) for k in range(2)]
        for label in range(5)
    }
    layouts = set()
    for _ in range(30):
        mosaic = make_mosaic(rng, by_class, 32, 4, NO_AUG)
        labels = [int(s[1]) for s in mosaic.sources]
        assert 2 <= len(labels) <= 4 and len(set(labels)) == len(labels)
        assert set(np.unique(mosaic.mask).tolist()) == set(labels)
        for source_id in mosaic.sources:
            label, k = int(source_id[1]), int(source_id.split("/")[1])
            assert np.all(mosaic.image[mosaic.mask == label] == 20 * label + k)
        layouts.add(mosaic.layout)
    assert layouts == {"voronoi", "blobs"}
