"""``prepare``: write the shards byte-for-byte reproducibly (the format is :mod:`pipeline.data.shards`).

It runs in three phases, each a list of independent tasks mapped over a pool of local processes (in order,
so the output does not depend on how many): load the source instances into a memory-mapped store, cut each
split's patches into another, then build and write each shard. Sources and patches live in files under a
temp dir in ``out_dir``, not in memory, so a folder larger than RAM prepares too.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pipeline.checkpoint import atomic_write_bytes, atomic_write_json
from pipeline.config import Config, DataConfig, to_dict
from pipeline.data.mosaics import make_mosaic, make_patches
from pipeline.data.shards import KINDS, MANIFEST, MTIME, npy_bytes
from pipeline.data.sources import (
    SPLITS,
    SourceImage,
    load_source,
    readable_sources,
    rng_for,
    source_specs,
    split_sources,
)
from pipeline.errors import UserError
from pipeline.images import png_bytes as encode_png

CUT_SOURCES = 8  # source instances per patch-cutting task


def _safe(text: str) -> str:
    """A source id usable inside a webdataset key (no dots, no slashes)."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", text)


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
