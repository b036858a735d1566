"""Loader throughput: the shard encodings against bare PNG decoding, and shards against one PNG file per sample.

First table (``run_encodings``), in process (no DataLoader workers), warm page cache, one core: the bare PIL
decode rate of the train patches' PNG bytes (held in memory: nothing else is done), the training loader
(``train_batches``) over ``data.encoding: png`` shards and over ``raw`` shards of the same patches (both
give the same tensors), their ratios and the bytes each encoding takes on disk. Target (GitHub issue 23):
the raw loader >= 5x the bare PNG decode rate.

Second table (``run``), PNG shards against per-sample PNG files:

Builds a patch dataset in a temp dir (7200 train patches by default, in shards of ``data.shard_max_samples``)
and writes the same train patches out as one PNG file each. Both loaders decode and batch with the same
function (``decode_batch``: PNG -> preallocated uint8 batch -> float once), with the same batch size, number
of DataLoader workers and shuffling (shards: the training stream's shard resampling + sample buffer;
files: a random permutation), for ``len // batch_size`` batches per timed pass. Passes are interleaved:
each repeat times both loaders with a warm page cache (every file read once beforehand) and with a cold
one (``os.sync()`` then ``posix_fadvise(DONTNEED)`` on every benchmarked file before the pass: the case of
a dataset larger than RAM or on a network disk), the loader order alternating between repeats. Prints the
median samples/s, the data each pass read from storage (``/proc/self/io``, workers included) and the
ratios.

    .venv/bin/python benchmarks/loader.py [--batch-size 64] [--workers 1] [--repeats 3] [--dir DIR]

``run_encodings(...)`` and ``run(...) -> dict`` do the same without printing (``report_encodings`` and
``report`` format them).

Caveats, both in the per-file loader's favour for the cold case: eviction drops file data only, so file
names and inodes stay cached (a truly cold per-file pass also reads those); and the training stream draws
shards with replacement, so a shard drawn twice in a pass is read from storage once (see its MB/pass).
``--dir`` must be on a real disk: eviction does nothing on tmpfs (0 MB read from storage in cold passes).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from pipeline import config
from pipeline.data.loaders import decode_batch, train_batches
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import load_manifest, tar_samples

ROOT = Path(__file__).resolve().parents[1]
DATASET = {
    "data.classes": [],  # all 10 builtin classes
    "data.instances_per_class": 10,
    "data.val_fraction": 0.1,
    "data.test_fraction": 0.1,  # 8 train sources per class
    "data.source_size": 64,
    "data.patch_size": 32,
    "data.patches_per_source": 90,  # 10 classes x 8 train sources x 90 = 7200 train patches
    "data.mosaics": {"train": 4, "val": 4, "test": 4},
    "data.min_shards": 4,
    "train.nproc_per_node": 1,
}
LOADERS = ("webdataset", "per-file")
CACHES = ("warm", "cold")
TARGET = 3.0  # GitHub issue 3: webdataset samples/s >= 3x the per-file loader's
ENCODING_TARGET = 5.0  # GitHub issue 23: raw-shard loader samples/s >= 5x the bare PNG decode rate
ENCODING_PATHS = ("bare PNG decode", "loader png", "loader raw")


class PngFolder(Dataset):
    """``<index>_<label>.png`` files; item = a list of indices -> their batch, decoded like shard samples."""

    def __init__(self, root: Path) -> None:
        self.files = sorted(root.glob("*.png"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        samples = []
        for index in indices:
            path = self.files[index]
            label = path.stem.split("_")[1]
            samples.append({"__key__": path.stem, "__url__": str(path), "png": path.read_bytes(), "cls": label})
        return decode_batch(samples, "patches")


def export_pngs(shard_dir: Path, out: Path) -> list[Path]:
    """Write every train patch of the shards as its own PNG file; returns the shard files read."""
    out.mkdir()
    count, shards = 0, []
    for shard in load_manifest(shard_dir)["splits"]["train"]["patches"]["shards"]:
        shards.append(shard_dir / shard["file"])
        for sample in tar_samples(shards[-1]):
            (out / f"{count:06d}_{int(sample['cls'])}.png").write_bytes(sample["png"])
            count += 1
    return shards


def warm_cache(paths: Iterable[Path]) -> None:
    for path in paths:
        path.read_bytes()


def evict_cache(paths: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages only, hence the sync; no root needed)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def storage_read_bytes() -> int:
    """Bytes this process and its reaped children (DataLoader workers) fetched from storage."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def timed_pass(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(samples/s, MB read from storage) of one pass over ``batches``, the loader's start-up included."""
    read, start, seen = storage_read_bytes(), time.perf_counter(), 0
    for images, _labels in batches:
        seen += len(images)
    seconds = time.perf_counter() - start
    return seen / seconds, (storage_read_bytes() - read) / 1e6


def bare_decode(pngs: list[bytes]) -> float:
    """Samples/s of decoding ``pngs`` with PIL into uint8 arrays, nothing else."""
    start = time.perf_counter()
    for data in pngs:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
            np.asarray(im)
    return len(pngs) / (time.perf_counter() - start)


def shard_bytes(shard_dir: Path) -> int:
    """Bytes of every shard of a shard root."""
    return sum(p.stat().st_size for p in shard_dir.glob("*/*.tar"))


def run_encodings(batch_size: int = 64, repeats: int = 5, directory: Path | None = None) -> dict[str, Any]:
    """Bare PNG decoding against the in-process training loader over png and raw shards of the same patches.

    Returns ``samples_per_s`` ({path: median}), ``runs`` ({path: [samples/s per repeat]}), ``ratio``
    (``raw/bare``, ``raw/png``, ``png/bare``), ``bytes`` ({encoding: bytes of all shards}), ``train_bytes``
    ({encoding: bytes of the train patch shards}), ``target`` and the settings.
    """
    torch.set_num_threads(1)  # one core, as the bare decode
    with tempfile.TemporaryDirectory(prefix="loader-enc-", dir=directory) as tmp:
        roots = {enc: Path(tmp) / enc for enc in ("png", "raw")}
        for enc, root in roots.items():
            prepare_dataset(config.load(ROOT / "params.yaml", DATASET | {"data.encoding": enc}), root, progress=False)
        entries = load_manifest(roots["png"])["splits"]["train"]["patches"]["shards"]
        pngs = [s["png"] for e in entries for s in tar_samples(roots["png"] / e["file"])]
        batches = len(pngs) // batch_size

        def loader(enc: str, r: int) -> float:
            batches_ = train_batches(
                roots[enc], "patches", "train", batch_size, batches,
                rank=0, world_size=1, num_workers=0, seed=r, epoch=r,
            )  # fmt: skip
            return timed_pass(batches_)[0]

        timers = {
            "bare PNG decode": lambda r: bare_decode(pngs),
            "loader png": lambda r: loader("png", r),
            "loader raw": lambda r: loader("raw", r),
        }
        runs: dict[str, list[float]] = {path: [] for path in ENCODING_PATHS}
        for r in range(repeats):
            for path in ENCODING_PATHS if r % 2 == 0 else ENCODING_PATHS[::-1]:
                runs[path].append(timers[path](r))
        size = {enc: shard_bytes(root) for enc, root in roots.items()}
        train = {
            enc: sum(e["bytes"] for e in load_manifest(root)["splits"]["train"]["patches"]["shards"])
            for enc, root in roots.items()
        }
    rates = {path: statistics.median(v) for path, v in runs.items()}
    bare, png, raw = (rates[path] for path in ENCODING_PATHS)
    return {
        "samples": len(pngs),
        "patch_size": DATASET["data.patch_size"],
        "batch_size": batch_size,
        "repeats": repeats,
        "samples_per_s": rates,
        "runs": runs,
        "ratio": {"raw/bare": raw / bare, "raw/png": raw / png, "png/bare": png / bare},
        "bytes": size,
        "train_bytes": train,
        "target": ENCODING_TARGET,
    }


def report_encodings(result: dict[str, Any]) -> str:
    """The encoding table and its ratio line."""
    lines = [
        f"{result['samples']} train patches of {result['patch_size']}px, batch {result['batch_size']}, in process "
        f"on one core, warm cache, median of {result['repeats']} interleaved repeats",
        f"{'path':<16} {'samples/s':>9}  runs",
    ]
    for path in ENCODING_PATHS:
        runs = ", ".join(f"{v:.0f}" for v in result["runs"][path])
        lines.append(f"{path:<16} {result['samples_per_s'][path]:9.0f}  {runs}")
    size, train, n = result["bytes"], result["train_bytes"], result["samples"]
    lines.append(
        "on disk: "
        + ", ".join(f"{enc} {size[enc] / 1e6:.1f} MB ({train[enc] / n:.0f} B per train patch)" for enc in size)
    )
    ratio = result["ratio"]
    lines.append(
        f"ratio raw/bare {ratio['raw/bare']:.2f}x (target >= {result['target']:.0f}x), "
        f"raw/png {ratio['raw/png']:.2f}x, png/bare {ratio['png/bare']:.2f}x"
    )
    return "\n".join(lines)


def run(batch_size: int = 64, workers: int = 1, repeats: int = 3, directory: Path | None = None) -> dict[str, Any]:
    """Benchmark both loaders in a temp dir under ``directory`` (default: the system's temp dir).

    Returns ``ratio`` ({"warm": x, "cold": y}, webdataset / per-file), ``samples_per_s`` and ``read_mb``
    ({cache: {loader: median}}), ``runs`` ({cache: {loader: [samples/s per repeat]}}), ``target`` and the
    settings (``samples``, ``patch_size``, ``shards``, ``batch_size``, ``workers``, ``repeats``).
    """
    cfg = config.load(ROOT / "params.yaml", DATASET | {"data.encoding": "png"})  # PNG shards against PNG files
    with tempfile.TemporaryDirectory(prefix="loader-bench-", dir=directory) as tmp:
        shard_dir, png_dir = Path(tmp) / "shards", Path(tmp) / "pngs"
        prepare_dataset(cfg, shard_dir, progress=False)
        shards = export_pngs(shard_dir, png_dir)
        folder = PngFolder(png_dir)
        files = {"webdataset": shards, "per-file": folder.files}
        n = len(folder)
        batches = n // batch_size

        def loader(name: str, r: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            if name == "webdataset":
                return train_batches(
                    shard_dir, "patches", "train", batch_size, batches,
                    rank=0, world_size=1, num_workers=workers, seed=r, epoch=r,
                )  # fmt: skip
            order = RandomSampler(folder, generator=torch.Generator().manual_seed(r))
            return DataLoader(
                folder, batch_size=None, sampler=BatchSampler(order, batch_size, drop_last=True),
                num_workers=workers, persistent_workers=False,
            )  # fmt: skip

        runs: dict[str, dict[str, list[float]]] = {c: {name: [] for name in LOADERS} for c in CACHES}
        read_mb: dict[str, dict[str, list[float]]] = {c: {name: [] for name in LOADERS} for c in CACHES}
        for r in range(repeats):
            for cache in CACHES:
                for name in LOADERS if r % 2 == 0 else LOADERS[::-1]:
                    if cache == "warm":
                        warm_cache(files[name])
                    else:
                        evict_cache([*shards, *folder.files])
                    rate, mb = timed_pass(loader(name, r))
                    runs[cache][name].append(rate)
                    read_mb[cache][name].append(mb)
    rates = {c: {name: statistics.median(v) for name, v in by.items()} for c, by in runs.items()}
    return {
        "samples": n,
        "patch_size": cfg.data.patch_size,
        "shards": len(shards),
        "batch_size": batch_size,
        "workers": workers,
        "repeats": repeats,
        "samples_per_s": rates,  # {cache: {loader: median}}
        "runs": runs,  # {cache: {loader: [samples/s per repeat]}}
        "read_mb": {c: {name: statistics.median(v) for name, v in by.items()} for c, by in read_mb.items()},
        "ratio": {c: rates[c]["webdataset"] / rates[c]["per-file"] for c in CACHES},
        "target": TARGET,
    }


def report(result: dict[str, Any]) -> str:
    """The table and the final ratio line."""
    lines = [
        f"{result['samples']} patches of {result['patch_size']}px: {result['shards']} shards vs "
        f"{result['samples']} files; batch {result['batch_size']}, {result['workers']} worker(s), "
        f"median of {result['repeats']} interleaved repeats",
        f"{'cache':<6} {'loader':<11} {'samples/s':>9} {'MB read/pass':>12}  runs",
    ]
    for cache in CACHES:
        for name in LOADERS:
            runs = ", ".join(f"{v:.0f}" for v in result["runs"][cache][name])
            rate, mb = result["samples_per_s"][cache][name], result["read_mb"][cache][name]
            lines.append(f"{cache:<6} {name:<11} {rate:9.0f} {mb:12.1f}  {runs}")
    ratio = result["ratio"]
    lines.append(f"ratio webdataset/per-file: warm {ratio['warm']:.2f}x, cold {ratio['cold']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the dataset (a real disk)")
    ns = parser.parse_args()
    print(report_encodings(run_encodings(ns.batch_size, max(ns.repeats, 5), ns.dir)), flush=True)
    print()
    print(report(run(ns.batch_size, ns.workers, ns.repeats, ns.dir)))


if __name__ == "__main__":
    main()
