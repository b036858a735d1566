"""WebDataset shards: write them byte-for-byte reproducibly, describe them in a manifest, verify them.

Layout of ``out_dir``: ``patches/<split>-NNNNNN.tar`` (``<key>.png`` + ``<key>.cls``),
``mosaics/<split>-NNNNNN.tar`` (``<key>.png`` + ``<key>.mask.png`` + ``<key>.json``) and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.checkpoint import atomic_write_bytes, atomic_write_json
from pipeline.config import Config, DataConfig, to_dict
from pipeline.data import storage
from pipeline.data.mosaics import make_mosaic, make_patches
from pipeline.data.sources import SPLITS, SourceImage, SourceSet, load_sources, rng_for
from pipeline.errors import UserError

MANIFEST = "manifest.json"
KINDS = ("patches", "mosaics")
MEMBERS = {"patches": ("png", "cls"), "mosaics": ("png", "mask.png", "json")}
MTIME = 0  # constant member mtime (an int: a float mtime makes tarfile add a pax header per member)
PNG_LEVEL = 6


class ShardError(UserError):
    """A missing, truncated or corrupt shard, as one line naming it.

    torch re-raises an error from a DataLoader worker as ``ShardError("Caught ShardError in DataLoader worker
    ...<traceback>...")``: the original one-line message is recovered from the traceback's last line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ShardError") and "Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) RGB or (H, W) L array; PIL writes no timestamps, so bytes are stable."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def decode_png(data: bytes, mode: str) -> np.ndarray:
    """A PNG as a uint8 array in PIL ``mode`` ("RGB" -> (H, W, 3), "L" -> (H, W)); raises on bad data."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG" or im.mode != mode:
            raise ValueError(f"expected a {mode} PNG, got {im.format} {im.mode}")
        return np.asarray(im, dtype=np.uint8).copy()


def _safe(text: str) -> str:
    """A source id usable inside a webdataset key (no dots, no slashes)."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", text)


# ---------------------------------------------------------------- writing


def sample_counts(data: DataConfig, sources: SourceSet) -> dict[str, dict[str, int]]:
    """{split: {kind: number of samples}}."""
    return {
        split: {
            "patches": len(sources.splits[split]) * data.patches_per_source,
            "mosaics": getattr(data.mosaics, split),
        }
        for split in SPLITS
    }


def shard_ranges(samples: int, max_per_shard: int, min_shards: int) -> list[tuple[int, int]]:
    """[start, end) sample ranges: at least ``min_shards`` shards of at most ``max_per_shard``, sizes within 1."""
    count = max(min_shards, math.ceil(samples / max_per_shard))
    return [(j * samples // count, (j + 1) * samples // count) for j in range(count)]


def _patch_samples(
    sources: list[SourceImage], data: DataConfig, seed: int, split: str, bar: tqdm
) -> list[dict[str, Any]]:
    crops = [
        (source, j, patch)
        for source in sources
        for j, patch in enumerate(make_patches(source, data.patches_per_source, data.patch_size, data.augment, seed))
    ]
    order = rng_for(seed, split, "patch-order").permutation(len(crops))  # each shard mixes classes
    samples = []
    for i, index in enumerate(order):
        source, j, patch = crops[index]
        samples.append(
            {"__key__": f"{i:06d}_{_safe(source.id)}_{j:03d}", "png": encode_png(patch), "cls": str(source.label)}
        )
        bar.update()
    return samples


def _mosaic_samples(
    sources: list[SourceImage], data: DataConfig, seed: int, split: str, bar: tqdm
) -> list[dict[str, Any]]:
    by_class: dict[int, list[SourceImage]] = {}
    for source in sources:
        by_class.setdefault(source.label, []).append(source)
    samples = []
    for i in range(getattr(data.mosaics, split)):
        mosaic = make_mosaic(
            rng_for(seed, split, i, "mosaic"), by_class, data.mosaic_size, data.max_regions, data.augment
        )
        info = {"layout": mosaic.layout, "sources": mosaic.sources}
        samples.append(
            {
                "__key__": f"{i:06d}",
                "png": encode_png(mosaic.image),
                "mask.png": encode_png(mosaic.mask),
                "json": json.dumps(info, sort_keys=True),
            }
        )
        bar.update()
    return samples


def _tar_bytes(samples: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=MTIME) as writer:  # members sorted by extension within a sample
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def _write_shards(out_dir: Path, kind: str, split: str, samples: list[dict[str, Any]], data: DataConfig) -> list[dict]:
    shards = []
    for j, (start, end) in enumerate(shard_ranges(len(samples), data.shard_max_samples, data.min_shards)):
        rel = f"{kind}/{split}-{j:06d}.tar"
        blob = _tar_bytes(samples[start:end])
        atomic_write_bytes(out_dir / rel, blob)
        shards.append(
            {"file": rel, "samples": end - start, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
        )
    return shards


def prepare_dataset(cfg: Config, out_dir: Path, progress: bool = True) -> dict:
    """Write every split's patch and mosaic shards and ``manifest.json`` into ``out_dir``; return the manifest.

    Same params and seed give byte-identical files. The old manifest is removed first (a run that dies
    half-way leaves no manifest to trust) and shards of a previous run that are not rewritten are deleted.
    """
    data, out_dir = cfg.data, Path(out_dir)
    sources = load_sources(data, cfg.seed)
    if len(sources.classes) < 2:
        raise UserError(f"data.classes: mosaics need at least 2 classes, got {list(sources.classes)}")
    counts = sample_counts(data, sources)
    for split, kinds in counts.items():
        for kind, n in kinds.items():
            if n < data.min_shards:
                raise UserError(
                    f"data.min_shards: split {split!r} has {n} {kind} sample(s), "
                    f"fewer than min_shards={data.min_shards}"
                )
    (out_dir / MANIFEST).unlink(missing_ok=True)
    total = sum(n for kinds in counts.values() for n in kinds.values())
    splits: dict[str, dict[str, Any]] = {}
    with tqdm(total=total, desc="prepare", unit="sample", mininterval=1.0, disable=not progress) as bar:
        for split in SPLITS:
            split_sources = sources.splits[split]
            splits[split] = {}
            for kind, make in (("patches", _patch_samples), ("mosaics", _mosaic_samples)):
                samples = make(split_sources, data, cfg.seed, split, bar)
                shards = _write_shards(out_dir, kind, split, samples, data)
                splits[split][kind] = {"shards": shards, "samples": len(samples)}
    written = {out_dir / s["file"] for kinds in splits.values() for entry in kinds.values() for s in entry["shards"]}
    for kind in KINDS:
        for stale in (out_dir / kind).glob("*.tar"):
            if stale not in written:
                stale.unlink()
    manifest = {
        "classes": list(sources.classes),
        "splits": splits,
        "params": to_dict(data),
        "seed": cfg.seed,
        "sources": {split: [s.id for s in sources.splits[split]] for split in SPLITS},
        "skipped": sources.skipped,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- reading and verifying


def load_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shard root (a directory or a :mod:`~pipeline.data.storage` URL); a missing or invalid
    one is a :class:`UserError` naming it."""
    path = storage.join(shard_dir, MANIFEST)
    if storage.is_local(shard_dir) and not Path(path).is_file():
        raise UserError(f"{path}: manifest not found (run the prepare stage)")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: invalid manifest ({exc})") from None
    required = ("classes", "splits", "params", "sources", "skipped")
    missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise UserError(f"{path}: invalid manifest (missing {', '.join(missing)})")
    return manifest


def shard_entries(shard_dir: str | Path, manifest: dict, kind: str, split: str) -> list[dict]:
    """The manifest's shard list for (split, kind); an unknown split or kind is a :class:`UserError`."""
    splits, where = manifest["splits"], storage.join(shard_dir, MANIFEST)
    if split not in splits:
        raise UserError(f"{where}: no split {split!r} (have: {', '.join(splits)})")
    if kind not in splits[split]:
        raise UserError(f"{where}: no kind {kind!r} (have: {', '.join(splits[split])})")
    return splits[split][kind]["shards"]


def check_shard_files(shard_dir: str | Path, entries: list[dict]) -> None:
    """Every listed local shard exists with its recorded size (catches missing and truncated files cheaply;
    remote shards are checked as they are read)."""
    if not storage.is_local(shard_dir):
        return
    for entry in entries:
        path = Path(shard_dir) / entry["file"]
        if not path.is_file():
            raise ShardError(f"{path}: shard listed in the manifest is missing")
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise ShardError(f"{path}: shard has {size} bytes, the manifest says {entry['bytes']} (truncated?)")


def tar_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Samples of a tar read with plain :mod:`tarfile`: ``{"__key__": key, ext: bytes, ...}`` in file order."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            handle = tar.extractfile(member)
            assert handle is not None  # a regular file always has data
            current[ext] = handle.read()
    if current is not None:
        yield current


def check_sample(sample: dict[str, Any], kind: str, num_classes: int, side: int) -> None:
    """Raise ``ValueError`` if a sample lacks a member or does not decode to the expected shapes and labels."""
    missing = [m for m in MEMBERS[kind] if m not in sample]
    if missing:
        raise ValueError(f"missing member(s) {', '.join('.' + m for m in missing)}")
    image = decode_png(sample["png"], "RGB")
    if image.shape != (side, side, 3):
        raise ValueError(f"image is {image.shape}, expected ({side}, {side}, 3)")
    if kind == "patches":
        label = int(sample["cls"])
        if not 0 <= label < num_classes:
            raise ValueError(f"class index {label} out of range")
    else:
        mask = decode_png(sample["mask.png"], "L")
        if mask.shape != (side, side) or int(mask.max()) >= num_classes:
            raise ValueError("mask has the wrong shape or a class index out of range")
        json.loads(sample["json"])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _verify_shard(path: Path, entry: dict, kind: str, num_classes: int, side: int) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing"]
    blob = path.read_bytes()
    problems = []
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest")
    count = 0
    try:
        for sample in tar_samples(path):
            count += 1
            try:
                check_sample(sample, kind, num_classes, side)
            except Exception as exc:  # image decoders raise many types on bad bytes
                problems.append(f"{path}: sample {sample['__key__']}: {_one_line(exc)}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{path}: unreadable tar ({_one_line(exc)})")
        return problems
    if count != entry["samples"]:
        problems.append(f"{path}: {count} samples, the manifest says {entry['samples']}")
    return problems


def verify_shards(shard_dir: Path) -> list[str]:
    """Check every shard against the manifest: exists, sha256, sample count, every sample decodes.

    Returns one line per problem, each naming the file; also lists ``.tar`` files the manifest does not know.
    """
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    num_classes = len(manifest["classes"])
    sides = {"patches": manifest["params"]["patch_size"], "mosaics": manifest["params"]["mosaic_size"]}
    problems: list[str] = []
    listed: set[Path] = set()
    for kinds in manifest["splits"].values():
        for kind, group in kinds.items():
            for entry in group["shards"]:
                path = shard_dir / entry["file"]
                listed.add(path)
                problems += _verify_shard(path, entry, kind, num_classes, sides[kind])
    for kind in KINDS:
        problems += [
            f"{p}: not listed in the manifest" for p in sorted((shard_dir / kind).glob("*.tar")) if p not in listed
        ]
    return problems
