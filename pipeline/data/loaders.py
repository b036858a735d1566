"""WebDataset loaders: fixed-length, resampled training streams per rank; exact evaluation splits.

Training (``train_batches``): each rank takes every ``world_size``-th shard, each DataLoader worker every
``num_workers``-th of those (fewer shards than ranks x workers: everyone resamples all shards), draws shards
with replacement (``webdataset.ResampledShards``, so the stream never ends and no rank runs dry), shuffles
samples in a buffer, decodes and batches. Every rank yields exactly ``batches_per_epoch`` full batches, so
DDP ranks never wait on each other at an epoch end. All randomness is seeded from
(seed, rank, world_size, epoch, worker, num_workers): the same call gives the same batches, which is what
lets a trainer resume mid-epoch by re-creating the epoch's iterator and skipping the batches it has done.

Evaluation (``eval_batches``): rank r takes samples i with ``i % world_size == r`` in manifest order, so
every sample is seen exactly once across ranks; the last batch may be partial.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.data.shards import MEMBERS, ShardError, check_shard_files, decode_png, load_manifest, shard_entries

Kind = Literal["patches", "mosaics"]
SHUFFLE_BUFFER, SHUFFLE_INITIAL = 500, 100  # samples held; samples read before the first one is yielded
_SHARDS, _SHUFFLE = 0, 1  # purposes of the derived seeds


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker, (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _stream_seed(seed: int, rank: int, world_size: int, epoch: int, purpose: int) -> int:
    worker, workers = _worker()
    words = [seed, rank, world_size, epoch, worker, workers, purpose]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _no_worker_seed() -> int:
    return 0  # the worker is already part of the seed handed to ResampledShards


class RankShards(IterableDataset):
    """Endless ``{"url": shard}`` stream for one rank and DataLoader worker: its own shards, resampled."""

    def __init__(self, urls: list[str], rank: int, world_size: int, seed: int, epoch: int) -> None:
        super().__init__()
        self.urls, self.rank, self.world_size, self.seed, self.epoch = urls, rank, world_size, seed, epoch

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, workers = _worker()
        mine = self.urls[self.rank :: self.world_size][worker::workers] or self.urls
        seed = _stream_seed(self.seed, self.rank, self.world_size, self.epoch, _SHARDS)
        yield from wds.ResampledShards(mine, seed=seed, worker_seed=_no_worker_seed, deterministic=True)


def _expand(src: Iterable[dict[str, str]], expected: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Samples of each shard; a tar error or a sample count unlike the manifest's names the shard."""
    for item in src:
        url, count = item["url"], 0
        try:
            with open(url, "rb") as stream:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    count += 1
                    yield sample
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__  # drop wds's suffix
            reason = " ".join(reason.split())
            raise ShardError(f"{url}: cannot read shard ({reason})") from None
        if count != expected[url]:
            raise ShardError(f"{url}: {count} samples, the manifest says {expected[url]}")


def _shuffle(
    src: Iterable[dict[str, Any]], seed: int, rank: int, world_size: int, epoch: int
) -> Iterator[dict[str, Any]]:
    stage_seed = _stream_seed(seed, rank, world_size, epoch, _SHUFFLE)
    return wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_INITIAL, seed=stage_seed)(iter(src))


def decode_sample(sample: dict[str, Any], kind: str) -> tuple[np.ndarray, int | np.ndarray]:
    """A webdataset sample dict -> (image uint8 (H, W, 3), class index or mask uint8 (H, W)).

    Tensors are made once per batch in :func:`collate`: per-sample torch calls cost more than the decoding.
    """
    try:
        missing = [m for m in MEMBERS[kind] if m not in sample]
        if missing:
            raise ValueError(f"missing member(s) {', '.join('.' + m for m in missing)}")
        image = decode_png(sample["png"], "RGB")
        target = int(sample["cls"]) if kind == "patches" else decode_png(sample["mask.png"], "L")
    except Exception as exc:  # image decoders raise many types on bad bytes (OSError, SyntaxError, zlib.error...)
        raise ShardError(f"{sample['__url__']}: sample {sample['__key__']}: cannot decode ({exc})") from None
    return image, target


def collate(samples: list[tuple[np.ndarray, int | np.ndarray]]) -> tuple[Tensor, Tensor]:
    """Decoded samples -> (images float (B, 3, H, W) in [0, 1], labels int64 (B,) or masks int64 (B, H, W))."""
    images, targets = zip(*samples, strict=True)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    return batch, torch.from_numpy(np.asarray(targets, dtype=np.int64))


def _worker_share(src: Iterable[Any], total: int) -> Iterator[Any]:
    """This worker's batches of the ``total``: DataLoader takes one from each worker in turn, so exactly ``total``."""
    worker, workers = _worker()
    return islice(src, len(range(worker, total, workers)))


def _every_nth(src: Iterable[Any], offset: int, step: int) -> Iterator[Any]:
    return islice(src, offset, None, step)


def _shards(shard_dir: Path, kind: str, split: str) -> tuple[list[str], dict[str, int]]:
    shard_dir = Path(shard_dir)
    entries = shard_entries(shard_dir, load_manifest(shard_dir), kind, split)
    check_shard_files(shard_dir, entries)
    urls = [str(shard_dir / e["file"]) for e in entries]
    return urls, {url: e["samples"] for url, e in zip(urls, entries, strict=True)}


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")


def train_batches(
    shard_dir: Path,
    kind: Kind,
    split: str,
    batch_size: int,
    batches_per_epoch: int,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    epoch: int,
) -> Iterable[tuple[Tensor, Tensor]]:
    """Exactly ``batches_per_epoch`` batches of ``batch_size`` for this rank, the same for the same arguments.

    Patches: (images float (B, 3, P, P) in [0, 1], labels int64 (B,)); mosaics: (images, masks int64 (B, M, M)).
    A missing, truncated or corrupt shard raises :class:`ShardError` (a ``UserError``) naming it.
    """
    _check_rank(rank, world_size)
    urls, expected = _shards(shard_dir, kind, split)
    dataset = wds.DataPipeline(
        RankShards(urls, rank, world_size, seed, epoch),
        partial(_expand, expected=expected),
        partial(_shuffle, seed=seed, rank=rank, world_size=world_size, epoch=epoch),
        wds.map(partial(decode_sample, kind=kind)),
        wds.batched(batch_size, collation_fn=collate, partial=False),
        partial(_worker_share, total=batches_per_epoch),
    )
    if num_workers == 0:
        return dataset
    return DataLoader(
        dataset,
        batch_size=None,  # the pipeline batches itself
        num_workers=num_workers,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),  # leave the caller's global torch RNG untouched
    )


def eval_batches(
    shard_dir: Path, kind: Kind, split: str, batch_size: int, *, rank: int, world_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Every sample of the split exactly once across ranks: rank r gets samples i with i % world_size == r."""
    _check_rank(rank, world_size)
    urls, expected = _shards(shard_dir, kind, split)
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        partial(_expand, expected=expected),
        partial(_every_nth, offset=rank, step=world_size),
        wds.map(partial(decode_sample, kind=kind)),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return iter(dataset)
