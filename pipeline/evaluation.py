"""Test-set evaluation of the trained GAN and segmenter, exact and independent of the number of ranks.

GAN: class-balanced samples of the EMA generator (``evaluate.samples_per_class`` per class) against every
*test* patch, in the texture extractor's feature space (or Inception's with ``evaluate.fid_features:
inception``): FID, KID, improved precision/recall, density/coverage, the per-class diversity ratio (mode
collapse shows up as recall and diversity near 0) and intra-class FID, next to two baselines in the
same features and sample counts: an *untrained* generator of the same architecture and real *train*
patches (``fid_real``, what a perfect generator could reach).

Segmenter: the confusion matrix over every test mosaic pixel, per-class IoU, mIoU and pixel accuracy.

Distributed: generated samples come in fixed global chunks of ``evaluate.batch_size``, each from its
own seed, and rank r makes chunks k with ``k % world_size == r``; test data comes from ``eval_batches``
(sample i on rank ``i % world_size``). Features are gathered back into single-process order, so every
sample counts once and the numbers depend on the seed and ``evaluate.batch_size`` (the chunks) but not on
the world size (up to float32 round-off in the networks, ~1e-7 relative). Everything runs in fp32.
Every rank must call these functions; every rank gets the metrics, rank 0 alone the plot data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.data.loaders import eval_batches
from pipeline.data.shards import load_manifest
from pipeline.distributed import DistEnv, all_gather_cat, all_reduce_sum, broadcast_object, collective_device
from pipeline.errors import UserError
from pipeline.metrics.fid import (
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    GaussianStats,
    diversity_ratio,
    fid_from_stats,
    gather_features,
    kid,
    precision_recall_coverage,
)
from pipeline.metrics.segmentation import ConfusionMatrix
from pipeline.models.features import inception_extractor, load_feature_extractor
from pipeline.models.gan import Generator, generate_images, load_generator
from pipeline.models.unet import load_segmenter

GRID_PER_CLASS = 8  # real and generated patches per class in the sample grid
SEGMENTATION_EXAMPLES = 4  # test mosaics shown image | truth | prediction
CONFUSION_SAMPLES = 20_000  # test pixels written for DVC's confusion plot


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of generated-sample chunk ``chunk``: fixed per chunk, so samples do not depend on the rank layout."""
    return int(np.random.SeedSequence([seed, 0xE7A1, chunk]).generate_state(1)[0])


def _ordered_gather(local: Tensor, index: Tensor) -> Tensor:
    """Rows from every rank, sorted by their global ``index`` (on the CPU)."""
    device = collective_device()
    rows = all_gather_cat(local.to(device)).cpu()
    order = all_gather_cat(index.to(device)).cpu().argsort()
    return rows[order]


def _check_classes(path: Path, found: Any, classes: list[str]) -> None:
    if found is not None and list(found) != classes:
        raise UserError(f"{path}: made for classes {list(found)}, but the shards have {classes}")


def load_extractor(cfg: Config, features_path: Path, classes: list[str], device: torch.device) -> tuple[nn.Module, str]:
    """The FID feature extractor and its name for ``fid_features`` (the file's sha256, or ``"inception"``)."""
    if cfg.evaluate.fid_features == "inception":
        return inception_extractor(device), "inception"
    extractor, meta = load_feature_extractor(features_path, device)
    _check_classes(Path(features_path), meta.get("classes"), classes)
    return extractor, meta["sha256"]


def _feature_dim(extractor: nn.Module, side: int, device: torch.device) -> int:
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
        local = torch.empty(0, _feature_dim(extractor, side, env.device), dtype=torch.float64)
        local_labels = torch.empty(0, dtype=torch.int64)
    return gather_features(local), gather_features(local_labels)


@torch.no_grad()
def generated_features(
    generator: Generator,
    extractor: nn.Module,
    num_classes: int,
    per_class: int,
    seed: int,
    batch_size: int,
    env: DistEnv,
) -> tuple[Tensor, Tensor]:
    """(features float64 (N, d), labels (N,)) of ``per_class`` samples per class (sample s has class s % C).

    Chunk k (samples ``k * batch_size ...``) is drawn with :func:`chunk_seed` on rank ``k % world_size``.
    """
    total = num_classes * per_class
    labels = torch.arange(total) % num_classes
    feats, index = [], []
    for k, start in enumerate(range(0, total, batch_size)):
        if k % env.world_size != env.rank:
            continue
        rows = torch.arange(start, min(start + batch_size, total))
        images = generate_images(generator, labels[rows], chunk_seed(seed, k), batch_size, env.device)
        feats.append(extractor(images.to(env.device)).to("cpu", torch.float64))
        index.append(rows)
    if feats:
        local, local_index = torch.cat(feats), torch.cat(index)
    else:
        local = torch.empty(0, _feature_dim(extractor, generator.image_size, env.device), dtype=torch.float64)
        local_index = torch.empty(0, dtype=torch.int64)
    return _ordered_gather(local, local_index), labels


def frechet(a: Tensor, b: Tensor) -> float:
    """FID between two feature sets (float64 Gaussian statistics)."""
    stats_a, stats_b = GaussianStats(a.shape[1]), GaussianStats(b.shape[1])
    stats_a.update(a)
    stats_b.update(b)
    return fid_from_stats(stats_a, stats_b)


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def class_balanced(feats: Tensor, labels: Tensor, per_class: int) -> tuple[Tensor, Tensor]:
    """The first ``per_class`` rows of each class (fewer where a class has fewer), in their original order."""
    keep = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in labels.unique()]).sort().values
    return feats[keep], labels[keep]


def fid_per_class(
    real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor, classes: list[str]
) -> dict[str, float | None]:
    """Intra-class FID per class name (``None`` where either side has fewer than 2 rows of the class)."""
    out = {}
    for c, name in enumerate(classes):
        r, f = real[real_labels == c], fake[fake_labels == c]
        out[name] = frechet(r, f) if min(r.shape[0], f.shape[0]) >= 2 else None
    return out


def gan_metrics(
    real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor, classes: list[str], k: int, seed: int
) -> dict[str, Any]:
    """FID, KID, precision/recall/density/coverage, diversity ratio and intra-class FID of ``fake`` vs ``real``."""
    kid_mean, kid_std = kid(real, fake, KID_SUBSETS, KID_SUBSET_SIZE, seed=seed)
    diversity = diversity_ratio(real, real_labels, fake, fake_labels)
    return {
        "fid": frechet(real, fake),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        **precision_recall_coverage(real, fake, k),
        "diversity": _finite(diversity["mean"]),
        "diversity_per_class": {
            name: _finite(value) for name, value in zip(classes, diversity["per_class"], strict=True)
        },
        "fid_per_class": fid_per_class(real, real_labels, fake, fake_labels, classes),
        "num_samples": int(fake.shape[0]),
        "num_real": int(real.shape[0]),
    }


def _uint8_images(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _first_per_class(shard_dir: Path, num_classes: int, per_class: int, batch_size: int) -> list[np.ndarray]:
    """The first ``per_class`` test patches of each class in manifest order, uint8 (k, H, W, 3) per class."""
    found: list[list[Tensor]] = [[] for _ in range(num_classes)]
    for images, labels in eval_batches(shard_dir, "patches", "test", batch_size, rank=0, world_size=1):
        for image, label in zip(images, labels.tolist(), strict=True):
            if len(found[label]) < per_class:
                found[label].append(image)
        if all(len(f) == per_class for f in found):
            break
    side = load_manifest(shard_dir)["params"]["patch_size"]
    return [_uint8_images(torch.stack(f)) if f else np.zeros((0, side, side, 3), np.uint8) for f in found]


def gan_plot_data(
    generator: Generator, shard_dir: Path, classes: list[str], seed: int, batch_size: int, device: Any
) -> dict:
    """Images for the per-class sample grid: real test patches and generated samples, uint8 (k, H, W, 3) per class."""
    labels = torch.arange(len(classes)).repeat_interleave(GRID_PER_CLASS)
    generated = _uint8_images(generate_images(generator, labels, seed, batch_size, device))
    return {
        "classes": classes,
        "real": _first_per_class(shard_dir, len(classes), GRID_PER_CLASS, batch_size),
        "generated": [generated[c * GRID_PER_CLASS : (c + 1) * GRID_PER_CLASS] for c in range(len(classes))],
    }


def evaluate_gan(cfg: Config, env: DistEnv, shard_dir: Path, generator_path: Path, features_path: Path) -> dict:
    """``{"metrics": gan.json content (every rank), "plots": sample grid data (rank 0; {} elsewhere)}``.

    ``metrics``: fid, fid_ratio (fid / fid_untrained), kid_mean, kid_std, fid_features, num_samples, num_real,
    precision, recall, density, coverage, diversity, diversity_per_class, fid_per_class and baselines
    (fid_untrained, fid_real, with the recall and diversity of each, and num_real_train).
    """
    shard_dir, ev = Path(shard_dir), cfg.evaluate
    classes = list(load_manifest(shard_dir)["classes"])
    generator, meta = load_generator(generator_path, env.device)
    _check_classes(Path(generator_path), meta.get("classes"), classes)
    extractor, features_name = load_extractor(cfg, Path(features_path), classes, env.device)
    with torch.random.fork_rng(devices=[]):  # the same untrained weights on every rank and every run
        torch.manual_seed(cfg.seed)
        untrained = Generator(**generator.kwargs).to(env.device).eval()

    real, real_labels = real_features(extractor, shard_dir, "test", ev.batch_size, env)
    sample = (len(classes), ev.samples_per_class, cfg.seed, ev.batch_size, env)
    fake, fake_labels = generated_features(generator, extractor, *sample)
    floor, floor_labels = generated_features(untrained, extractor, *sample)
    train, train_labels = real_features(extractor, shard_dir, "train", ev.batch_size, env)
    train, train_labels = class_balanced(train, train_labels, ev.samples_per_class)

    metrics: dict[str, Any] | None = None
    plots: dict[str, Any] = {}
    if env.is_main:
        metrics = gan_metrics(real, real_labels, fake, fake_labels, classes, ev.knn_k, cfg.seed)
        baselines = {}
        for name, (f, f_labels) in {"untrained": (floor, floor_labels), "real": (train, train_labels)}.items():
            baselines[f"fid_{name}"] = frechet(real, f)
            baselines[f"recall_{name}"] = precision_recall_coverage(real, f, ev.knn_k)["recall"]
            baselines[f"diversity_{name}"] = _finite(diversity_ratio(real, real_labels, f, f_labels)["mean"])
        # What each class's FID is for real train patches from other sources: the floor of ``fid_per_class``
        # (a few test sources per class make it large for the periodic classes).
        baselines["fid_per_class_real"] = fid_per_class(real, real_labels, train, train_labels, classes)
        metrics |= {
            # FID's scale belongs to the extractor; its ratio to the untrained generator's FID in the same
            # features is what the register gate reads (1 = no better than the initial weights).
            "fid_ratio": metrics["fid"] / baselines["fid_untrained"],
            "fid_features": features_name,
            "baselines": baselines | {"num_real_train": int(train.shape[0])},
        }
        plots = gan_plot_data(generator, shard_dir, classes, cfg.seed, ev.batch_size, env.device)
    return {"metrics": broadcast_object(metrics), "plots": plots}


def pixel_sample(mosaic: int, num_mosaics: int, pixels: int, seed: int) -> Tensor:
    """Flat pixel positions of test mosaic ``mosaic`` in the confusion-plot sample.

    A stratified uniform sample of :data:`CONFUSION_SAMPLES` pixels: each mosaic gives an equal share
    (the first ones one more when it does not divide), drawn without replacement from a generator
    seeded by (seed, mosaic), so it depends on nothing else.
    """
    share, extra = divmod(CONFUSION_SAMPLES, num_mosaics)
    count = min(pixels, share + (mosaic < extra))
    gen = torch.Generator().manual_seed(chunk_seed(seed, mosaic))
    return torch.randperm(pixels, generator=gen)[:count].sort().values


@torch.no_grad()
def _segmentation_examples(model: nn.Module, shard_dir: Path, device: Any) -> dict[str, np.ndarray]:
    images, masks = next(eval_batches(shard_dir, "mosaics", "test", SEGMENTATION_EXAMPLES, rank=0, world_size=1))
    pred = model(images.to(device)).argmax(1).cpu()
    return {
        "images": _uint8_images(images),
        "truth": masks.numpy().astype(np.uint8),
        "pred": pred.numpy().astype(np.uint8),
    }


@torch.no_grad()
def evaluate_segmenter(cfg: Config, env: DistEnv, shard_dir: Path, model_path: Path) -> dict:
    """``{"metrics": segmenter.json content (every rank), "plots": confusion/IoU/examples data (rank 0)}``.

    ``metrics``: miou, pixel_accuracy, iou (class -> IoU, None for a class in neither truth nor
    prediction, also listed in absent_classes), num_images, num_pixels: the model as it serves (with its
    test-time views); miou_single_view, pixel_accuracy_single_view: its network on one view.
    """
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    classes = list(manifest["classes"])
    model, meta = load_segmenter(model_path, env.device)
    _check_classes(Path(model_path), meta.get("classes"), classes)
    num_mosaics = manifest["splits"]["test"]["mosaics"]["samples"]
    pixels = manifest["params"]["mosaic_size"] ** 2

    matrix, single_view = ConfusionMatrix(len(classes)), ConfusionMatrix(len(classes))
    picked, index = [torch.empty(0, 2, dtype=torch.int64)], [torch.empty(0, dtype=torch.int64)]
    seen = 0
    batches = eval_batches(
        shard_dir, "mosaics", "test", cfg.evaluate.batch_size, rank=env.rank, world_size=env.world_size
    )
    for images, masks in batches:
        images = images.to(env.device)
        pred = model(images).argmax(1).cpu()
        matrix.update(pred, masks)
        single_view.update(model.logits(images).argmax(1).cpu(), masks)
        for p, t in zip(pred.flatten(1), masks.flatten(1), strict=True):
            mosaic = seen * env.world_size + env.rank  # eval_batches' rank-strided order
            positions = pixel_sample(mosaic, num_mosaics, pixels, cfg.seed)
            picked.append(torch.stack([t[positions], p[positions]], 1))
            index.append(mosaic * pixels + positions)
            seen += 1
    matrix.reduce_from_all_processes()
    single_view.reduce_from_all_processes()
    num_images = int(all_reduce_sum(torch.tensor([seen], device=collective_device())).item())
    sample = _ordered_gather(torch.cat(picked), torch.cat(index))

    result, single = matrix.compute(), single_view.compute()
    iou = {
        name: (value if present else None)
        for name, value, present in zip(classes, result["iou"], result["present"], strict=True)
    }
    metrics = {
        "miou": _finite(result["miou"]),
        "pixel_accuracy": _finite(result["pixel_accuracy"]),
        "iou": iou,
        "absent_classes": [name for name, value in iou.items() if value is None],
        "num_images": num_images,
        "num_pixels": int(matrix.mat.sum()),
        "miou_single_view": _finite(single["miou"]),
        "pixel_accuracy_single_view": _finite(single["pixel_accuracy"]),
    }
    plots: dict[str, Any] = {}
    if env.is_main:
        plots = {
            "classes": classes,
            "confusion": result["confusion"],
            "iou": [iou[name] for name in classes],
            "actual": sample[:, 0].numpy(),
            "predicted": sample[:, 1].numpy(),
            **_segmentation_examples(model, shard_dir, env.device),
        }
    return {"metrics": metrics, "plots": plots}
