"""Features of real images in the FID extractor's space (a split, or folders), sharded across ranks, gathered in order.

Test data comes from ``eval_batches`` (sample i on rank ``i % world_size``); features are gathered back
into single-process order, so every sample counts once and the numbers do not depend on the world size
(up to float32 round-off in the networks, ~1e-7 relative). Every rank must call these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.data.loaders import eval_batches
from pipeline.data.shards import load_manifest
from pipeline.distributed import DistEnv, gather_in_order
from pipeline.errors import UserError
from pipeline.models.features import MIN_SIZE, inception_extractor, load_feature_extractor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of generated-sample chunk ``chunk``: fixed per chunk, so samples do not depend on the rank layout."""
    return int(np.random.SeedSequence([seed, 0xE7A1, chunk]).generate_state(1)[0])


def check_classes(path: Path, found: Any, classes: list[str]) -> None:
    if found is not None and list(found) != classes:
        raise UserError(f"{path}: made for classes {list(found)}, but the shards have {classes}")


def load_extractor(
    features_path: Path | str, classes: list[str] | None, device: torch.device, inception: bool = False
) -> tuple[nn.Module, str]:
    """The FID feature extractor and its name for ``fid_features`` (the file's sha256, or ``"inception"``).

    With ``classes``, a texture extractor trained on other classes is a :class:`UserError` naming the file.
    """
    if inception:
        return inception_extractor(device), "inception"
    extractor, meta = load_feature_extractor(features_path, device)
    if classes is not None:
        check_classes(Path(features_path), meta.get("classes"), classes)
    return extractor, meta["sha256"]


def feature_dim(extractor: nn.Module, side: int, device: torch.device) -> int:
    with torch.no_grad():
        return int(extractor(torch.zeros(1, 3, side, side, device=device)).shape[1])


@torch.no_grad()
def real_features(
    extractor: nn.Module, shard_dir: Path, split: str, batch_size: int, env: DistEnv
) -> tuple[Tensor, Tensor]:
    """(features float64 (N, d), labels (N,)) of every patch of ``split``, in manifest order, on every rank."""
    feats, labels = [], []
    for images, y in eval_batches(shard_dir, "patches", split, batch_size, rank=env.rank, world_size=env.world_size):
        feats.append(extractor(images.to(env.device)).to("cpu", torch.float64))
        labels.append(y)
    if feats:
        local, local_labels = torch.cat(feats), torch.cat(labels)
    else:  # more ranks than samples: still take part in the gather, with the right row shape
        side = load_manifest(shard_dir)["params"]["patch_size"]
        local = torch.empty(0, feature_dim(extractor, side, env.device), dtype=torch.float64)
        local_labels = torch.empty(0, dtype=torch.int64)
    return gather_in_order(local), gather_in_order(local_labels)


@torch.no_grad()
def classifier_accuracy(model: nn.Module, shard_dir: Path, split: str, batch_size: int) -> tuple[float, int]:
    """(accuracy, number of samples) of a patch classifier on every patch of ``split`` (one process)."""
    model.eval()
    correct = total = 0
    for images, labels in eval_batches(shard_dir, "patches", split, batch_size, rank=0, world_size=1):
        correct += int((model(images).argmax(1) == labels).sum())
        total += labels.numel()
    return correct / max(total, 1), total


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; a missing or imageless folder is a UserError."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as exc:  # PIL's UnidentifiedImageError included
        raise UserError(f"{path}: cannot read image ({exc})") from None


def check_same_size(files_a: list[Path], files_b: list[Path]) -> None:
    """Every image the size of the first and at least the extractor's minimum, else a UserError naming it."""
    size = _image_size(files_a[0])
    for path in files_a + files_b:
        if (odd := _image_size(path)) != size:
            raise UserError(
                f"{path}: image is {odd[0]}x{odd[1]} but {files_a[0]} is {size[0]}x{size[1]}; "
                "all images must share one size"
            )
    if min(size) < MIN_SIZE:
        raise UserError(f"{files_a[0]}: images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {size[0]}x{size[1]}")


def _read_batch(paths: list[Path]) -> Tensor:
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except OSError as exc:
            raise UserError(f"{path}: cannot read image ({exc})") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def folder_features(files: list[Path], extractor: nn.Module, batch_size: int, device: torch.device) -> Tensor:
    """Features float64 (N, d) of image files, in batches of ``batch_size`` (one process)."""
    chunks = [
        extractor(_read_batch(files[start : start + batch_size]).to(device)).to("cpu", torch.float64)
        for start in range(0, len(files), batch_size)
    ]
    return torch.cat(chunks)
