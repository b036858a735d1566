"""WebDataset loaders: fixed-length, resampled training streams per rank; exact evaluation splits.

Training (``train_batches``): each rank takes every ``world_size``-th shard, each DataLoader worker every
``num_workers``-th of those (fewer shards than ranks x workers: everyone resamples all shards), draws shards
with replacement (``webdataset.ResampledShards``, so the stream never ends and no rank runs dry), shuffles
samples in a buffer, decodes and batches. Shards are read whole and split by a minimal tar-header parser
(:mod:`tarfile` reads anything else: its header parsing took as long as the PNG decoding), and PNGs are
decoded straight into one uint8 batch, converted to float once. Every rank yields exactly
``batches_per_epoch`` full batches, so DDP ranks never wait on each other at an epoch end. All randomness
is seeded from (seed, rank, world_size, epoch, worker, num_workers): the same call gives the same batches,
which is what lets a trainer resume mid-epoch by re-creating the epoch's iterator and skipping the batches
it has done.

Evaluation (``eval_batches``): rank r takes samples i with ``i % world_size == r`` in manifest order, so
every sample is seen exactly once across ranks; the last batch may be partial.

``shard_dir`` is a local directory or any shard root of :mod:`pipeline.data.storage` (``s3://bucket/prefix``,
``https://...``, ``pipe:COMMAND {}``): shards are streamed from object storage without a local copy.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import storage
from pipeline.data.shards import MEMBERS, ShardError, check_shard_files, decode_block, load_manifest, shard_entries
from pipeline.distributed import die_with_parent
from pipeline.errors import one_line
from pipeline.images import decode_png

Kind = Literal["patches", "mosaics"]
SHUFFLE_BUFFER, SHUFFLE_INITIAL = 500, 100  # samples held; samples read before the first one is yielded
_SHARDS, _SHUFFLE = 0, 1  # purposes of the derived seeds
_BLOCK, _ZERO_BLOCK, _REGULAR = 512, bytes(512), b"0\0"  # tar block size, end marker, regular-file typeflags
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata names, skipped
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key.extension split


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


def _plain_members(blob: bytes) -> list[tuple[str, bytes]] | None:
    """(name, data) of the regular files of an in-memory tar made only of plain ustar headers (what
    ``TarWriter`` writes for short ASCII names), or None for anything else (pax or GNU headers, links, a bad
    checksum, truncation, an empty archive) so that :mod:`tarfile` reads it, or names what is wrong.

    About five times faster than :mod:`tarfile` (whose header parsing took as long as decoding the PNG).
    """
    members, offset, end = [], 0, len(blob)
    try:
        while offset + _BLOCK <= end:
            header = blob[offset : offset + _BLOCK]
            if header == _ZERO_BLOCK:  # end-of-archive marker
                break
            if (
                header[156] not in _REGULAR
                or header[345]
                or sum(header) - sum(header[148:156]) + 256 != _octal(header[148:156])
            ):
                return None
            size, start = _octal(header[124:136]), offset + _BLOCK
            if not 0 <= size <= end - start:
                return None
            members.append((header[:100].split(b"\0", 1)[0].decode("ascii"), blob[start : start + size]))
            offset = start + -(-size // _BLOCK) * _BLOCK
    except ValueError:  # a numeric field in base-256 or not octal, a non-ASCII name (UnicodeDecodeError)
        return None
    return members or None


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _tarfile_members(blob: bytes) -> list[tuple[str, bytes]]:
    """(name, data) of the regular files of any tar :mod:`tarfile` reads; raises ``TarError`` on a bad one."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]  # type: ignore[union-attr]


def _group(members: list[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """Consecutive members sharing a key as one sample ``{"__key__", "__url__", ext: bytes, ...}``.

    The key is the name up to the first dot of its last path component, the extension is lower-cased and
    ``__meta__`` names are skipped, as webdataset groups them.
    """
    sample: dict[str, Any] | None = None
    for name, data in members:
        match = None if _META.match(name) else _KEY_EXT.match(name)
        if match is None:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"{name}: duplicate member")
        sample[ext] = data
    if sample is not None:
        yield sample


def _expand(src: Iterable[dict[str, str]], shards: _Shards) -> Iterator[Any]:
    """Samples of each shard, read whole into memory (a shard holds at most ``data.shard_max_samples``): png
    sample dicts, or raw ``(image, target)`` array views of the shard's block.

    A read or tar error, or a size, sample count or image size unlike the manifest's, is a :class:`ShardError`
    naming it.
    """
    for item in src:
        url, entry = item["url"], shards.entries[item["url"]]
        try:
            blob = storage.read_bytes(url)
        except storage.StorageError as exc:
            raise ShardError(str(exc)) from None
        if "bytes" in entry and len(blob) != entry["bytes"]:
            raise ShardError(f"{url}: shard has {len(blob)} bytes, the manifest says {entry['bytes']} (truncated?)")
        try:
            members = _plain_members(blob)
            samples = list(_group(_tarfile_members(blob) if members is None else members, url))
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise ShardError(f"{url}: cannot read shard ({one_line(exc)})") from None
        if shards.encoding == "raw":
            samples = [item for block in samples for item in _block_items(block, shards.kind, shards.side)]
        if len(samples) != entry["samples"]:
            raise ShardError(f"{url}: {len(samples)} samples, the manifest says {entry['samples']}")
        yield from samples


def _block_items(block: dict[str, Any], kind: str, side: int) -> Iterator[tuple[np.ndarray, Any]]:
    """A raw block's samples as (image (S, S, 3), label or mask (S, S)) views; a :class:`ShardError` naming it."""
    try:
        images, targets, _keys = decode_block(block, kind)
        if images.shape[1] != side:
            raise ValueError(f"images are {images.shape[1]}px, the manifest says {side}px")
    except Exception as exc:  # numpy's .npy reader raises several types on bad bytes
        raise ShardError(f"{block['__url__']}: block {block['__key__']}: cannot decode ({one_line(exc)})") from None
    return zip(images, targets, strict=True)


def _shuffle(
    src: Iterable[dict[str, Any]], seed: int, rank: int, world_size: int, epoch: int
) -> Iterator[dict[str, Any]]:
    stage_seed = _stream_seed(seed, rank, world_size, epoch, _SHUFFLE)
    return wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_INITIAL, seed=stage_seed)(iter(src))


def _decode_sample(sample: dict[str, Any], kind: str) -> tuple[np.ndarray, int | np.ndarray]:
    """(image uint8 (H, W, 3), class index or mask uint8 (H, W)); a :class:`ShardError` naming the sample."""
    try:
        missing = [m for m in MEMBERS["png"][kind] if m not in sample]
        if missing:
            raise ValueError(f"missing member(s) {', '.join('.' + m for m in missing)}")
        image = decode_png(sample["png"], "RGB")
        return image, int(sample["cls"]) if kind == "patches" else decode_png(sample["mask.png"], "L")
    except Exception as exc:  # image decoders raise many types on bad bytes (OSError, SyntaxError, zlib.error...)
        raise ShardError(f"{sample['__url__']}: sample {sample['__key__']}: cannot decode ({one_line(exc)})") from None


def decode_batch(samples: Sequence[dict[str, Any]], kind: str) -> tuple[Tensor, Tensor]:
    """One or more png sample dicts -> (images float (B, 3, H, W) in [0, 1], labels int64 (B,) or masks int64
    (B, H, W)).

    PNGs are decoded into one preallocated uint8 batch that is converted to float once (per-sample tensors
    and stacking cost more than the decoding). A sample that does not decode, or whose shape differs from
    the first one's, is a :class:`ShardError` naming its shard and key.
    """
    image, target = _decode_sample(samples[0], kind)
    images = np.empty((len(samples), *image.shape), np.uint8)
    targets = np.empty((len(samples), *np.shape(target)), np.int64)
    for i, sample in enumerate(samples):
        if i:
            image, target = _decode_sample(sample, kind)
            if image.shape != images.shape[1:] or np.shape(target) != targets.shape[1:]:
                raise ShardError(
                    f"{sample['__url__']}: sample {sample['__key__']}: image is {image.shape[:2]}, "
                    f"the batch's first is {images.shape[1:3]}"
                )
        images[i], targets[i] = image, target
    return _tensors(images, targets)


def stack_batch(samples: Sequence[tuple[np.ndarray, Any]], kind: str) -> tuple[Tensor, Tensor]:
    """Raw ``(image, label or mask)`` samples (of blocks whose sizes were checked) -> the tensors of
    :func:`decode_batch`."""
    return _tensors(np.stack([image for image, _ in samples]), np.stack([target for _, target in samples]))


def _tensors(images: np.ndarray, targets: np.ndarray) -> tuple[Tensor, Tensor]:
    """uint8 (B, H, W, 3) and integer targets -> float (B, 3, H, W) in [0, 1] and int64 targets.

    Transposed as uint8, then converted to float once: a third faster than a strided float division.
    """
    chw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return chw.to(torch.float32).div_(255), torch.from_numpy(targets.astype(np.int64, copy=False))


def _batches(
    src: Iterable[Any], size: int, shards: _Shards, keep_last: bool, pin_memory: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of ``size`` samples (the last, shorter one only if ``keep_last``), in pinned memory if asked."""
    collate = stack_batch if shards.encoding == "raw" else decode_batch
    samples = iter(src)
    while batch := list(islice(samples, size)):
        if len(batch) < size and not keep_last:
            return
        images, targets = collate(batch, shards.kind)
        yield (images.pin_memory(), targets.pin_memory()) if pin_memory else (images, targets)


def _worker_share(src: Iterable[Any], total: int) -> Iterator[Any]:
    """This worker's batches of the ``total``: DataLoader takes one from each worker in turn, so exactly ``total``."""
    worker, workers = _worker()
    return islice(src, len(range(worker, total, workers)))


def _every_nth(src: Iterable[Any], offset: int, step: int) -> Iterator[Any]:
    return islice(src, offset, None, step)


@dataclass(frozen=True)
class _Shards:
    """One (split, kind) of a shard root: shard locations, each one's manifest entry, encoding and image side."""

    urls: list[str]
    entries: dict[str, dict]
    kind: str
    encoding: str
    side: int


def _shards(shard_dir: str | Path, kind: str, split: str) -> _Shards:
    manifest = load_manifest(shard_dir)
    entries = shard_entries(shard_dir, manifest, kind, split)
    check_shard_files(shard_dir, entries)
    urls = [storage.join(shard_dir, e["file"]) for e in entries]
    side = manifest["params"]["patch_size" if kind == "patches" else "mosaic_size"]
    return _Shards(urls, dict(zip(urls, entries, strict=True)), kind, manifest["encoding"], side)


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")


def train_batches(
    shard_dir: str | Path,
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
    pin_memory: bool = False,
) -> Iterable[tuple[Tensor, Tensor]]:
    """Exactly ``batches_per_epoch`` batches of ``batch_size`` for this rank, the same for the same arguments.

    Patches: (images float (B, 3, P, P) in [0, 1], labels int64 (B,)); mosaics: (images, masks int64 (B, M, M)).
    The same for either ``data.encoding``. ``pin_memory`` (for a CUDA device only) gives page-locked tensors,
    so that ``.to(device, non_blocking=True)`` copies overlap the computation.
    A missing, truncated or corrupt shard raises :class:`ShardError` (a ``UserError``) naming it.
    """
    _check_rank(rank, world_size)
    shards = _shards(shard_dir, kind, split)
    in_process = num_workers == 0
    dataset = wds.DataPipeline(
        RankShards(shards.urls, rank, world_size, seed, epoch),
        partial(_expand, shards=shards),
        partial(_shuffle, seed=seed, rank=rank, world_size=world_size, epoch=epoch),
        partial(_batches, size=batch_size, shards=shards, keep_last=False, pin_memory=pin_memory and in_process),
        partial(_worker_share, total=batches_per_epoch),
    )
    if in_process:
        return dataset
    return DataLoader(
        dataset,
        batch_size=None,  # the pipeline batches itself
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),  # leave the caller's global torch RNG untouched
        worker_init_fn=partial(_init_worker, parent=os.getpid()),
    )


def train_stream(
    shard_dir: str | Path,
    kind: Kind,
    batch_size: int,
    batches_per_epoch: int,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    start: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``train`` batches, epoch after epoch of :func:`train_batches`, without the first ``start``.

    Batch ``n`` is batch ``n % batches_per_epoch`` of epoch ``n // batches_per_epoch``, so a run resumed
    after ``start`` batches sees exactly the batches it would have seen without the restart.
    """
    epoch, skip = divmod(start, batches_per_epoch)
    while True:
        batches = train_batches(
            shard_dir,
            kind,
            "train",
            batch_size,
            batches_per_epoch,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            seed=seed,
            epoch=epoch,
            pin_memory=pin_memory,
        )
        yield from islice(batches, skip, None)
        epoch, skip = epoch + 1, 0


def _init_worker(worker_id: int, parent: int) -> None:
    """A stop signal sent to the job's process group (Ctrl-C, ``kill -TERM -PGID``) is the trainer's to handle
    (checkpoint, exit 143): in its own group a worker does not get it, so the main process does not fail with
    "DataLoader worker killed" before it can save. Workers still stop with their DataLoader (it signals them
    by pid) and die at once with the main process (``parent``), even in the middle of a batch."""
    os.setpgid(0, 0)
    die_with_parent(parent)


def eval_batches(
    shard_dir: str | Path,
    kind: Kind,
    split: str,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    pin_memory: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Every sample of the split exactly once across ranks: rank r gets samples i with i % world_size == r.

    ``pin_memory`` as for :func:`train_batches`.
    """
    _check_rank(rank, world_size)
    shards = _shards(shard_dir, kind, split)
    dataset = wds.DataPipeline(
        wds.SimpleShardList(shards.urls),
        partial(_expand, shards=shards),
        partial(_every_nth, offset=rank, step=world_size),
        partial(_batches, size=batch_size, shards=shards, keep_last=True, pin_memory=pin_memory),
    )
    return iter(dataset)
