"""WebDataset shards: write them byte-for-byte reproducibly, describe them in a manifest, verify them.

Layout of ``out_dir``: ``patches/<split>-NNNNNN.tar``, ``mosaics/<split>-NNNNNN.tar`` and ``manifest.json``
(which records ``data.encoding``). Members per encoding:

- ``png``: one webdataset sample per patch (``<key>.png`` + ``<key>.cls``) or mosaic (``<key>.png`` +
  ``<key>.mask.png`` + ``<key>.json``): small on disk, but the loader decodes a PNG per sample.
- ``raw``: one block per shard, keyed by its first sample's index: ``<first>.images.npy`` (uint8
  (N, S, S, 3)), ``<first>.labels.npy`` (int64 (N,)) or ``<first>.masks.npy`` (uint8 (N, S, S)) and
  ``<first>.info.json`` (the mosaics' layouts and sources), and ``<first>.keys.json`` (the N sample keys
  of the png encoding): no decoding at all, so the loader only copies bytes.

Both encodings hold the same samples in the same order with the same keys.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.checkpoint import atomic_write_bytes, atomic_write_json
from pipeline.config import Config, DataConfig, to_dict
from pipeline.data import storage
from pipeline.data.mosaics import make_mosaic, make_patches
from pipeline.data.sources import (
    SPLITS,
    SourceImage,
    load_source,
    readable_sources,
    rng_for,
    source_specs,
    split_sources,
)
from pipeline.errors import UserError, one_line
from pipeline.images import png_bytes as encode_png

MANIFEST = "manifest.json"
KINDS = ("patches", "mosaics")
ENCODINGS = ("png", "raw")
MEMBERS = {  # {encoding: {kind: the members of one sample (png) or block (raw)}}
    "png": {"patches": ("png", "cls"), "mosaics": ("png", "mask.png", "json")},
    "raw": {
        "patches": ("images.npy", "labels.npy", "keys.json"),
        "mosaics": ("images.npy", "masks.npy", "keys.json", "info.json"),
    },
}
CUT_SOURCES = 8  # source instances per patch-cutting task
MTIME = 0  # constant member mtime (an int: a float mtime makes tarfile add a pax header per member)


class ShardError(UserError):
    """A missing, truncated or corrupt shard, as one line naming it.

    torch re-raises an error from a DataLoader worker as ``ShardError("Caught ShardError in DataLoader worker
    ...<traceback>...")``: the original one-line message is recovered from the traceback's last line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ShardError") and "Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


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
#
# prepare runs in three phases, each a list of independent tasks mapped over a pool of local processes
# (in order, so the output does not depend on how many): load the source instances into a memory-mapped
# store, cut each split's patches into another, then build and write each shard. Sources and patches live
# in files under a temp dir in ``out_dir``, not in memory, so a folder larger than RAM prepares too.


def sample_counts(data: DataConfig, sources: dict[str, list[SourceImage]]) -> dict[str, dict[str, int]]:
    """{split: {kind: number of samples}}."""
    return {
        split: {"patches": len(sources[split]) * data.patches_per_source, "mosaics": getattr(data.mosaics, split)}
        for split in SPLITS
    }


def shard_ranges(samples: int, max_per_shard: int, min_shards: int) -> list[tuple[int, int]]:
    """[start, end) sample ranges: at least ``min_shards`` shards of at most ``max_per_shard``, sizes within 1."""
    count = max(min_shards, math.ceil(samples / max_per_shard))
    return [(j * samples // count, (j + 1) * samples // count) for j in range(count)]


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (format 1.0 header: the same array gives the same bytes)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class _Job:
    """What every prepare task needs: the params, the temp dir of the stores and the output directory."""

    data: DataConfig
    seed: int
    tmp: Path
    out_dir: Path

    def sources(self) -> np.ndarray:
        return np.load(self.tmp / "sources.npy", mmap_mode="r")

    def patches(self, split: str, mode: Literal["r", "r+"] = "r") -> np.ndarray:
        return np.load(self.tmp / f"patches-{split}.npy", mmap_mode=mode)


SourceRef = tuple[str, int, int]  # (id, label, row in the source store): a source instance as a task gets it


def _cut_patches(job: _Job, split: str, refs: list[SourceRef], first: int) -> int:
    """Crops of ``refs`` (the split's sources from position ``first``) into the split's patch store."""
    store, sources, n = job.patches(split, "r+"), job.sources(), job.data.patches_per_source
    for pos, (source_id, label, row) in enumerate(refs, first):
        source = SourceImage(source_id, label, sources[row], row)
        store[pos * n : (pos + 1) * n] = make_patches(source, n, job.data.patch_size, job.data.augment, job.seed)
    return len(refs)


def _patch_shard(job: _Job, split: str, refs: list[SourceRef], start: int, end: int) -> list[dict[str, Any]]:
    n = job.data.patches_per_source
    order = rng_for(job.seed, split, "patch-order").permutation(len(refs) * n)[start:end]  # shards mix classes
    patches = job.patches(split)[order]
    keys = [f"{i:06d}_{_safe(refs[index // n][0])}_{index % n:03d}" for i, index in enumerate(order, start)]
    labels = [refs[index // n][1] for index in order]
    if job.data.encoding == "raw":
        arrays = {"images.npy": npy_bytes(patches), "labels.npy": npy_bytes(np.asarray(labels, np.int64))}
        return [{"__key__": f"{start:06d}", **arrays, "keys.json": json.dumps(keys)}]
    return [
        {"__key__": key, "png": encode_png(patch), "cls": str(label)}
        for key, patch, label in zip(keys, patches, labels, strict=True)
    ]


def _mosaic_shard(job: _Job, split: str, refs: list[SourceRef], start: int, end: int) -> list[dict[str, Any]]:
    store, data = job.sources(), job.data
    by_class: dict[int, list[SourceImage]] = {}
    for source_id, label, row in refs:
        by_class.setdefault(label, []).append(SourceImage(source_id, label, store[row], row))
    mosaics = [
        make_mosaic(rng_for(job.seed, split, i, "mosaic"), by_class, data.mosaic_size, data.max_regions, data.augment)
        for i in range(start, end)
    ]
    infos = [{"layout": m.layout, "sources": m.sources} for m in mosaics]
    keys = [f"{i:06d}" for i in range(start, end)]
    if data.encoding == "raw":
        return [
            {
                "__key__": f"{start:06d}",
                "images.npy": npy_bytes(np.stack([m.image for m in mosaics])),
                "masks.npy": npy_bytes(np.stack([m.mask for m in mosaics])),
                "keys.json": json.dumps(keys),
                "info.json": json.dumps(infos, sort_keys=True),
            }
        ]
    return [
        {
            "__key__": key,
            "png": encode_png(m.image),
            "mask.png": encode_png(m.mask),
            "json": json.dumps(info, sort_keys=True),
        }
        for key, m, info in zip(keys, mosaics, infos, strict=True)
    ]


def _tar_bytes(samples: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=MTIME) as writer:  # members sorted by extension within a sample
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def _write_shard(job: _Job, kind: str, split: str, j: int, refs: list[SourceRef], start: int, end: int) -> dict:
    """Build shard ``j`` of (split, kind), samples [start, end), write it atomically; its manifest entry."""
    samples = (_patch_shard if kind == "patches" else _mosaic_shard)(job, split, refs, start, end)
    rel = f"{kind}/{split}-{j:06d}.tar"
    blob = _tar_bytes(samples)
    atomic_write_bytes(job.out_dir / rel, blob)
    return {"file": rel, "samples": end - start, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}


def _call(task: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    function, args = task
    return function(*args)


def prepare_workers(data: DataConfig) -> int:
    """Local processes for prepare: ``data.workers``, 0 = every core this process may use."""
    return data.workers or len(os.sched_getaffinity(0))


@contextmanager
def _task_map(
    workers: int,
) -> Iterator[Callable[[Iterable[tuple[Callable[..., Any], tuple[Any, ...]]]], Iterator[Any]]]:
    """``run(tasks)``: each ``(function, args)``'s result, in order; in this process or a pool of ``workers``."""
    if workers == 1:
        yield partial(map, _call)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield partial(pool.imap, _call)


def _load_sources(
    job: _Job, run: Callable[..., Iterator[Any]]
) -> tuple[tuple[str, ...], dict[str, list[SourceImage]], list[dict[str, str]]]:
    """Phase 1: every source instance into ``sources.npy`` (rows in load order); classes, splits, skipped files."""
    data = job.data
    classes, specs = source_specs(data)
    size = data.source_size
    store = np.lib.format.open_memmap(job.tmp / "sources.npy", "w+", np.uint8, (len(specs), size, size, 3))
    skipped: list[dict[str, str]] = []
    loaded = run((load_source, (spec, data, job.seed)) for spec in specs)
    sources = []
    for row, spec, image in readable_sources(specs, loaded, skipped):
        store[row] = image
        sources.append(SourceImage(spec.id, spec.label, store[row], row))
    store.flush()
    return classes, split_sources(sources, classes, data, job.seed), skipped


def prepare_dataset(cfg: Config, out_dir: Path, progress: bool = True) -> dict:
    """Write every split's patch and mosaic shards and ``manifest.json`` into ``out_dir``; return the manifest.

    Same params and seed give byte-identical files, whatever ``data.workers``. The old manifest is removed
    first (a run that dies half-way leaves no manifest to trust) and shards of a previous run that are not
    rewritten are deleted.
    """
    data, out_dir = cfg.data, Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix=".prepare-", dir=out_dir) as tmp,
        _task_map(prepare_workers(data)) as run,
    ):
        job = _Job(data, cfg.seed, Path(tmp), out_dir)
        classes, sources, skipped = _load_sources(job, run)
        if len(classes) < 2:
            raise UserError(f"data.classes: mosaics need at least 2 classes, got {list(classes)}")
        counts = sample_counts(data, sources)
        for split, kinds in counts.items():
            for kind, n in kinds.items():
                if n < data.min_shards:
                    raise UserError(
                        f"data.min_shards: split {split!r} has {n} {kind} sample(s), "
                        f"fewer than min_shards={data.min_shards}"
                    )
        refs = {split: [(s.id, s.label, s.row) for s in sources[split]] for split in SPLITS}
        side = data.patch_size
        for split in SPLITS:
            shape = (counts[split]["patches"], side, side, 3)
            np.lib.format.open_memmap(job.tmp / f"patches-{split}.npy", "w+", np.uint8, shape).flush()
        cut = [
            (_cut_patches, (job, split, refs[split][k : k + CUT_SOURCES], k))
            for split in SPLITS
            for k in range(0, len(refs[split]), CUT_SOURCES)
        ]
        shards = [
            (split, kind, j, start, end)
            for split in SPLITS
            for kind in KINDS
            for j, (start, end) in enumerate(shard_ranges(counts[split][kind], data.shard_max_samples, data.min_shards))
        ]
        splits: dict[str, dict[str, Any]] = {
            split: {kind: {"shards": [], "samples": counts[split][kind]} for kind in KINDS} for split in SPLITS
        }
        total = sum(n for kinds in counts.values() for n in kinds.values())
        with tqdm(total=total, desc="prepare", unit="sample", mininterval=1.0, disable=not progress) as bar:
            for done in run(cut):
                bar.update(done * data.patches_per_source / 2)  # cutting is about half a patch's work
            write = run((_write_shard, (job, kind, split, j, refs[split], a, b)) for split, kind, j, a, b in shards)
            for (split, kind, *_), entry in zip(shards, write, strict=True):
                splits[split][kind]["shards"].append(entry)
                bar.update(entry["samples"] / 2 if kind == "patches" else entry["samples"])
    written = {out_dir / s["file"] for kinds in splits.values() for entry in kinds.values() for s in entry["shards"]}
    for kind in KINDS:
        for stale in (out_dir / kind).glob("*.tar"):
            if stale not in written:
                stale.unlink()
    manifest = {
        "classes": list(classes),
        "encoding": data.encoding,
        "splits": splits,
        "params": {k: v for k, v in to_dict(data).items() if k != "workers"},  # the shards do not depend on it
        "seed": cfg.seed,
        "sources": {split: [s.id for s in sources[split]] for split in SPLITS},
        "skipped": skipped,
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
    required = ("classes", "encoding", "splits", "params", "sources", "skipped")
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


def _npy(data: bytes, dtype: type, ndim: int, name: str) -> np.ndarray:
    array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if array.dtype != dtype or array.ndim != ndim:
        raise ValueError(f"{name} is {array.dtype} {array.shape}, expected {np.dtype(dtype)} with {ndim} dimensions")
    return array


def _check_members(sample: dict[str, Any], kind: str, encoding: str) -> None:
    missing = [m for m in MEMBERS[encoding][kind] if m not in sample]
    if missing:
        raise ValueError(f"missing member(s) {', '.join('.' + m for m in missing)}")


def decode_block(sample: dict[str, Any], kind: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A raw block -> (images uint8 (N, S, S, 3), labels int64 (N,) or masks uint8 (N, S, S), the N sample keys).

    Raises ``ValueError`` on a missing member or arrays of the wrong type or shapes.
    """
    _check_members(sample, kind, "raw")
    images = _npy(sample["images.npy"], np.uint8, 4, "images.npy")
    n, side = len(images), images.shape[1]
    if kind == "patches":
        targets, expected = _npy(sample["labels.npy"], np.int64, 1, "labels.npy"), (n,)
    else:
        targets, expected = _npy(sample["masks.npy"], np.uint8, 3, "masks.npy"), (n, side, side)
    if images.shape[2:] != (side, 3) or targets.shape != expected:
        raise ValueError(
            f"images are {images.shape} and targets {targets.shape}: not N square RGB images and N targets"
        )
    keys = json.loads(sample["keys.json"])
    if not isinstance(keys, list) or len(keys) != n:
        raise ValueError(f"keys.json does not hold {n} keys")
    return images, targets, keys


def check_sample(sample: dict[str, Any], kind: str, encoding: str, num_classes: int, side: int) -> int:
    """The number of samples in a png sample (1) or raw block; ``ValueError`` if it lacks a member or does not
    decode to the expected shapes and labels."""
    if encoding == "raw":
        images, targets, _keys = decode_block(sample, kind)
        if images.shape[1] != side:
            raise ValueError(f"images are {images.shape[1]}px, expected {side}px")
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError("class index out of range")
        if kind == "mosaics" and len(json.loads(sample["info.json"])) != len(images):
            raise ValueError(f"info.json does not describe {len(images)} mosaics")
        return len(images)
    _check_members(sample, kind, encoding)
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
    return 1


def _verify_shard(path: Path, entry: dict, kind: str, encoding: str, num_classes: int, side: int) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing"]
    blob = path.read_bytes()
    problems = []
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest")
    count = 0
    try:
        for sample in tar_samples(path):
            try:
                count += check_sample(sample, kind, encoding, num_classes, side)
            except Exception as exc:  # image decoders raise many types on bad bytes
                problems.append(f"{path}: sample {sample['__key__']}: {one_line(exc)}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{path}: unreadable tar ({one_line(exc)})")
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
                problems += _verify_shard(path, entry, kind, manifest["encoding"], num_classes, sides[kind])
    for kind in KINDS:
        problems += [
            f"{p}: not listed in the manifest" for p in sorted((shard_dir / kind).glob("*.tar")) if p not in listed
        ]
    return problems
