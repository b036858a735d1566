"""Generator evaluation: FID, KID, precision/recall/coverage, diversity, intra-class FID and class fidelity in one
place.

The test protocol (:func:`evaluate_gan`): class-balanced samples of the EMA generator
(``evaluate.samples_per_class`` per class) against every *test* patch, in the texture extractor's feature
space (or Inception's with ``evaluate.fid_features: inception``), next to two baselines in the same
features and sample counts: an *untrained* generator of the same architecture and real *train* patches
(``fid_real``, what a perfect generator could reach). Class fidelity is the share of samples that the texture
extractor's classifier gives the class they were drawn for (chance: 1 / classes). Per-step validation during training
(:func:`val_generator_scores`) reads the same features and maths on the val split. Generated samples come
in fixed global chunks of ``batch_size``, chunk k made on rank ``k % world_size`` and gathered back in sample
order, so the numbers do not depend on the world size. Everything runs in fp32.
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
from pipeline.distributed import DistEnv, broadcast_object, gather_in_order
from pipeline.errors import UserError
from pipeline.evaluation.features import (
    check_classes,
    check_same_size,
    chunk_seed,
    feature_dim,
    folder_features,
    list_images,
    load_extractor,
    real_features,
)
from pipeline.images import to_uint8
from pipeline.metrics.fid import (
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    GaussianStats,
    diversity_ratio,
    fid_from_stats,
    kid,
    precision_recall_coverage,
)
from pipeline.models.gan import (
    ImageGenerator,
    generate_from_noise,
    generate_images,
    load_generator,
    noise,
    same_architecture,
)

GRID_PER_CLASS = 8  # real and generated patches per class in the sample grid


def class_samples(num_classes: int, per_class: int, z_dim: int, seed: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """(latents, labels) of the test protocol: sample s has class s % C; chunk k's latents from :func:`chunk_seed`."""
    total = num_classes * per_class
    z = [
        noise(min(batch_size, total - start), z_dim, chunk_seed(seed, k))
        for k, start in enumerate(range(0, total, batch_size))
    ]
    return (torch.cat(z) if z else torch.empty(0, z_dim)), torch.arange(total) % num_classes


@torch.no_grad()
def generated_features(
    generator: ImageGenerator, extractor: nn.Module, z: Tensor, labels: Tensor, batch_size: int, env: DistEnv
) -> Tensor:
    """Features float64 (N, d) of ``generator(z, labels)`` in sample order, on every rank.

    Chunk k (samples ``k * batch_size ...``) is generated on rank ``k % world_size`` in eval mode.
    """
    feats, index = [], []
    for k, start in enumerate(range(0, labels.shape[0], batch_size)):
        if k % env.world_size != env.rank:
            continue
        rows = torch.arange(start, min(start + batch_size, labels.shape[0]))
        images = generate_from_noise(generator, z[rows], labels[rows], batch_size, env.device)
        feats.append(extractor(images.to(env.device)).to("cpu", torch.float64))
        index.append(rows)
    if feats:
        local, local_index = torch.cat(feats), torch.cat(index)
    else:
        local = torch.empty(0, feature_dim(extractor, generator.image_size, env.device), dtype=torch.float64)
        local_index = torch.empty(0, dtype=torch.int64)
    return gather_in_order(local, local_index)


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


def class_fidelity(extractor: nn.Module, feats: Tensor, labels: Tensor, classes: list[str]) -> dict[str, Any]:
    """``class_fidelity``: the mean over classes of the share of rows that the texture ``extractor``'s classifier
    (``extractor.classify`` of its features ``feats``) assigns to their class ``labels``; and that share per class
    name (``class_fidelity_per_class``, ``None`` for a class without rows)."""
    predicted = extractor.classify(feats).argmax(1)
    per_class: dict[str, float | None] = {}
    for c, name in enumerate(classes):
        rows = labels == c
        per_class[name] = float((predicted[rows] == c).double().mean()) if rows.any() else None
    present = [v for v in per_class.values() if v is not None]
    mean = sum(present) / len(present) if present else None
    return {"class_fidelity": mean, "class_fidelity_per_class": per_class}


def val_generator_scores(real: Tensor, fake: Tensor, k: int) -> dict[str, float]:
    """The per-step validation numbers: FID, precision and recall of ``fake`` against ``real`` features."""
    prc = precision_recall_coverage(real, fake, k)
    return {"val_fid": frechet(real, fake), "val_precision": prc["precision"], "val_recall": prc["recall"]}


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
    return [to_uint8(torch.stack(f)) if f else np.zeros((0, side, side, 3), np.uint8) for f in found]


def gan_plot_data(
    generator: ImageGenerator, shard_dir: Path, classes: list[str], seed: int, batch_size: int, device: Any
) -> dict:
    """Images for the per-class sample grid: real test patches and generated samples, uint8 (k, H, W, 3) per class."""
    labels = torch.arange(len(classes)).repeat_interleave(GRID_PER_CLASS)
    generated = to_uint8(generate_images(generator, labels, seed, batch_size, device))
    return {
        "classes": classes,
        "real": _first_per_class(shard_dir, len(classes), GRID_PER_CLASS, batch_size),
        "generated": [generated[c * GRID_PER_CLASS : (c + 1) * GRID_PER_CLASS] for c in range(len(classes))],
    }


def evaluate_gan(cfg: Config, env: DistEnv, shard_dir: Path, generator_path: Path, features_path: Path) -> dict:
    """``{"metrics": gan.json content (every rank), "plots": sample grid data (rank 0; {} elsewhere)}``.

    ``metrics``: fid, fid_ratio (fid / fid_untrained), kid_mean, kid_std, fid_features, num_samples, num_real,
    precision, recall, density, coverage, diversity, diversity_per_class, fid_per_class, class_fidelity,
    class_fidelity_per_class and baselines (fid_untrained, fid_real, with the recall, diversity and class
    fidelity of each (the real one: the classifier's accuracy on the test patches), and num_real_train).
    Class fidelity always comes from the texture extractor, also with ``fid_features: inception``.
    """
    shard_dir, ev = Path(shard_dir), cfg.evaluate
    classes = list(load_manifest(shard_dir)["classes"])
    generator, meta = load_generator(generator_path, env.device)
    check_classes(Path(generator_path), meta.get("classes"), classes)
    inception = ev.fid_features == "inception"
    extractor, features_name = load_extractor(features_path, classes, env.device, inception)
    with torch.random.fork_rng(devices=[]):  # the same untrained weights on every rank and every run
        torch.manual_seed(cfg.seed)
        untrained = same_architecture(generator).to(env.device).eval()

    real, real_labels = real_features(extractor, shard_dir, "test", ev.batch_size, env)
    z, fake_labels = class_samples(len(classes), ev.samples_per_class, generator.z_dim, cfg.seed, ev.batch_size)
    fake = generated_features(generator, extractor, z, fake_labels, ev.batch_size, env)
    floor, floor_labels = generated_features(untrained, extractor, z, fake_labels, ev.batch_size, env), fake_labels
    texture, texture_feats = extractor, {"real": real, "untrained": floor, "generated": fake}
    if inception:  # class fidelity needs the texture classifier
        texture, _ = load_extractor(features_path, classes, env.device)
        texture_feats = {
            "real": real_features(texture, shard_dir, "test", ev.batch_size, env)[0],
            "untrained": generated_features(untrained, texture, z, fake_labels, ev.batch_size, env),
            "generated": generated_features(generator, texture, z, fake_labels, ev.batch_size, env),
        }
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
        for name, f_labels in {"untrained": fake_labels, "real": real_labels}.items():
            fidelity = class_fidelity(texture, texture_feats[name], f_labels, classes)
            baselines[f"class_fidelity_{name}"] = fidelity["class_fidelity"]
        metrics |= class_fidelity(texture, texture_feats["generated"], fake_labels, classes)
        metrics |= {
            # FID's scale belongs to the extractor; its ratio to the untrained generator's FID in the same
            # features is what the register gate reads (1 = no better than the initial weights).
            "fid_ratio": metrics["fid"] / baselines["fid_untrained"],
            "fid_features": features_name,
            "baselines": baselines | {"num_real_train": int(train.shape[0])},
        }
        plots = gan_plot_data(generator, shard_dir, classes, cfg.seed, ev.batch_size, env.device)
    return {"metrics": broadcast_object(metrics), "plots": plots}


def fid_between_folders(dir_a: Path, dir_b: Path, *, features: str, batch_size: int, device: str) -> dict:
    """FID and KID between two folders of same-size images (like pytorch-fid's CLI); nothing is resized.

    ``features`` is a texture extractor file or ``"inception"``. Returns fid, kid_mean, kid_std,
    num_a, num_b and features (the extractor's sha256, or 'inception').
    """
    if batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {batch_size}")
    files_a, files_b = list_images(Path(dir_a)), list_images(Path(dir_b))
    for folder, files in ((dir_a, files_a), (dir_b, files_b)):
        if len(files) < 2:
            raise UserError(f"{folder}: FID needs at least 2 images, found {len(files)}")
    check_same_size(files_a, files_b)
    torch_device = _device(device)
    extractor, name = load_extractor(features, None, torch_device, inception=features == "inception")
    feats_a, feats_b = (folder_features(f, extractor, batch_size, torch_device) for f in (files_a, files_b))
    kid_mean, kid_std = kid(feats_a, feats_b, KID_SUBSETS, KID_SUBSET_SIZE, seed=0)
    return {
        "fid": frechet(feats_a, feats_b),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "num_a": len(files_a),
        "num_b": len(files_b),
        "features": name,
    }


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {name!r} was asked for but no CUDA device is available")
    return device
