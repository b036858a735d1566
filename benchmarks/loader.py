"""Loader throughput: WebDataset shards vs one PNG file per sample, measured side by side.

Builds a small patch dataset in a temp dir, writes the same training patches out as individual PNG files,
then times one epoch of each loader with the same decoding and batching (``decode_sample``, ``collate``),
batch size and workers, alternating the two so machine load hits both alike. Prints samples/s (median of
the repeats) and the ratio.

    .venv/bin/python benchmarks/loader.py [--batch-size 64] [--workers 1] [--repeats 3]

Both read from the page cache after the first repeat, so this measures per-sample overhead (one open/stat
per file vs one sequential tar stream per shard), not disk or network latency, where shards gain far more.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import config
from pipeline.data.loaders import collate, decode_sample, train_batches
from pipeline.data.shards import load_manifest, prepare_dataset, tar_samples

ROOT = Path(__file__).resolve().parents[1]
DATASET = {
    "data.classes": [],
    "data.instances_per_class": 10,
    "data.source_size": 64,
    "data.patch_size": 32,
    "data.patches_per_source": 60,  # 10 classes x 6 train sources x 60 = 3600 train patches
    "data.mosaics": {"train": 4, "val": 4, "test": 4},
    "data.shard_max_samples": 1000,
    "data.min_shards": 4,
    "train.nproc_per_node": 1,
    "train.num_workers": 0,
}


class PngFolder(Dataset):
    """``<index>_<label>.png`` files, decoded exactly like a shard sample."""

    def __init__(self, root: Path) -> None:
        self.files = sorted(root.glob("*.png"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int | np.ndarray]:
        path = self.files[index]
        sample = {"__key__": path.stem, "__url__": str(path), "png": path.read_bytes(), "cls": path.stem.split("_")[1]}
        return decode_sample(sample, "patches")


def export_pngs(shard_dir: Path, out: Path) -> int:
    """Write every train patch of the shards as its own PNG file; returns the count."""
    out.mkdir()
    count = 0
    for shard in load_manifest(shard_dir)["splits"]["train"]["patches"]["shards"]:
        for sample in tar_samples(shard_dir / shard["file"]):
            (out / f"{count:06d}_{int(sample['cls'])}.png").write_bytes(sample["png"])
            count += 1
    return count


def samples_per_second(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    start, seen = time.perf_counter(), 0
    for images, _labels in batches:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    ns = parser.parse_args()
    cfg = config.load(ROOT / "params.yaml", DATASET)
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        shard_dir, png_dir = Path(tmp) / "shards", Path(tmp) / "pngs"
        prepare_dataset(cfg, shard_dir, progress=False)
        n = export_pngs(shard_dir, png_dir)
        batches = n // ns.batch_size
        folder = PngFolder(png_dir)
        rates: dict[str, list[float]] = {"webdataset": [], "png folder": []}
        for r in range(ns.repeats):
            shards = train_batches(
                shard_dir, "patches", "train", ns.batch_size, batches,
                rank=0, world_size=1, num_workers=ns.workers, seed=r, epoch=r,
            )  # fmt: skip
            rates["webdataset"].append(samples_per_second(shards))
            files = DataLoader(
                folder, batch_size=ns.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                num_workers=ns.workers, persistent_workers=False, generator=torch.Generator().manual_seed(r),
            )  # fmt: skip
            rates["png folder"].append(samples_per_second(files))
    print(
        f"{n} patches of {cfg.data.patch_size}px, batch {ns.batch_size}, {ns.workers} worker(s), {ns.repeats} repeats"
    )
    for name, values in rates.items():
        print(
            f"  {name:<11} {statistics.median(values):8.0f} samples/s  (runs: {', '.join(f'{v:.0f}' for v in values)})"
        )
    ratio = statistics.median(rates["webdataset"]) / statistics.median(rates["png folder"])
    print(f"  webdataset / png folder = {ratio:.2f}x")


if __name__ == "__main__":
    main()
