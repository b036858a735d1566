"""The shard format: members per encoding, the manifest, reading and verifying shards (``prepare`` writes them).

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
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import storage
from pipeline.errors import UserError, one_line
from pipeline.images import decode_png

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


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (format 1.0 header: the same array gives the same bytes)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


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
