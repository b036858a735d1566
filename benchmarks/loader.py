"""Loader throughput: WebDataset shards vs one PNG file per sample, warm and cold page cache, side by side.

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

``run(...) -> dict`` does the same without printing (``report(result)`` formats it).

Caveats, both in the per-file loader's favour for the cold case: eviction drops file data only, so file
names and inodes stay cached (a truly cold per-file pass also reads those); and the training stream draws
shards with replacement, so a shard drawn twice in a pass is read from storage once (see its MB/pass).
``--dir`` must be on a real disk: eviction does nothing on tmpfs (0 MB read from storage in cold passes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from pipeline import config
from pipeline.data.loaders import decode_batch, train_batches
from pipeline.data.shards import load_manifest, prepare_dataset, tar_samples

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


def run(batch_size: int = 64, workers: int = 1, repeats: int = 3, directory: Path | None = None) -> dict[str, Any]:
    """Benchmark both loaders in a temp dir under ``directory`` (default: the system's temp dir).

    Returns ``ratio`` ({"warm": x, "cold": y}, webdataset / per-file), ``samples_per_s`` and ``read_mb``
    ({cache: {loader: median}}), ``runs`` ({cache: {loader: [samples/s per repeat]}}), ``target`` and the
    settings (``samples``, ``patch_size``, ``shards``, ``batch_size``, ``workers``, ``repeats``).
    """
    cfg = config.load(ROOT / "params.yaml", DATASET)
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
    print(report(run(ns.batch_size, ns.workers, ns.repeats, ns.dir)))


if __name__ == "__main__":
    main()
