"""Segmenter evaluation: the confusion matrix over every mosaic pixel of a split, per-class IoU, mIoU, accuracy.

:func:`split_confusion` is the one pass over a split, shared by the per-epoch validation during training
(one view, the training precision) and the test protocol (:func:`evaluate_segmenter`: the model as it
serves, with its test-time views, and its network on one view, in fp32). Each rank predicts its share
(mosaic i on rank i % world_size) and the matrices are summed over ranks, so every mosaic counts once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.data.loaders import eval_batches
from pipeline.data.shards import load_manifest
from pipeline.distributed import DistEnv, all_reduce_sum, collective_device, gather_in_order, plain_module
from pipeline.evaluation.features import check_classes, chunk_seed
from pipeline.images import to_uint8
from pipeline.metrics.segmentation import ConfusionMatrix
from pipeline.models.segmenters import load_segmenter

SEGMENTATION_EXAMPLES = 4  # test mosaics shown image | truth | prediction
CONFUSION_SAMPLES = 20_000  # test pixels written for DVC's confusion plot


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


@torch.no_grad()
def split_confusion(
    model: nn.Module,
    shard_dir: Path,
    split: str,
    batch_size: int,
    env: DistEnv,
    views: dict[str, Callable[[Tensor], Tensor]],
    *,
    channels_last: bool = False,
    amp: bool = False,
    on_batch: Callable[[Tensor, dict[str, Tensor]], None] | None = None,
) -> dict[str, ConfusionMatrix]:
    """One confusion matrix per view (``name -> images -> scores``) over every mosaic of ``split``, summed
    over ranks. The model is put in eval mode for the pass (and back); ``on_batch(masks, predictions)`` sees
    this rank's batches in order."""
    net = plain_module(model)  # no DDP wrapper: ranks may get different numbers of batches
    was_training = net.training
    net.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    num_classes = len(load_manifest(shard_dir)["classes"])
    matrices = {name: ConfusionMatrix(num_classes) for name in views}
    try:
        for images, masks in eval_batches(
            shard_dir, "mosaics", split, batch_size, rank=env.rank, world_size=env.world_size
        ):
            images = images.to(env.device).contiguous(memory_format=fmt)
            with env.autocast() if amp else contextlib.nullcontext():
                predictions = {name: view(images).argmax(1).cpu() for name, view in views.items()}
            for name, pred in predictions.items():
                matrices[name].update(pred, masks)
            if on_batch is not None:
                on_batch(masks, predictions)
    finally:
        net.train(was_training)
    for matrix in matrices.values():
        matrix.reduce_from_all_processes()
    return matrices


def val_segmenter_scores(
    model: nn.Module, shard_dir: Path, batch_size: int, env: DistEnv, classes: list[str], channels_last: bool
) -> dict[str, Any]:
    """The per-epoch validation: one view (``logits``) in the training precision; ``val_*`` metrics and the
    matrix's ``compute()`` result under ``result``. One view ranks epochs as the served views would, at ~1/6
    of their cost."""
    net = plain_module(model)
    views = {"single": net.logits}
    result = split_confusion(model, shard_dir, "val", batch_size, env, views, channels_last=channels_last, amp=True)[
        "single"
    ].compute()
    metrics = {"val_miou": result["miou"], "val_pixel_accuracy": result["pixel_accuracy"]}
    metrics |= {f"val_iou_{name}": iou for name, iou in zip(classes, result["iou"], strict=True)}
    return {"metrics": metrics, "result": result}


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
        "images": to_uint8(images),
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
    check_classes(Path(model_path), meta.get("classes"), classes)
    num_mosaics = manifest["splits"]["test"]["mosaics"]["samples"]
    pixels = manifest["params"]["mosaic_size"] ** 2

    picked, index = [torch.empty(0, 2, dtype=torch.int64)], [torch.empty(0, dtype=torch.int64)]
    seen = 0

    def sample_pixels(masks: Tensor, predictions: dict[str, Tensor]) -> None:
        nonlocal seen
        for p, t in zip(predictions["served"].flatten(1), masks.flatten(1), strict=True):
            mosaic = seen * env.world_size + env.rank  # eval_batches' rank-strided order
            positions = pixel_sample(mosaic, num_mosaics, pixels, cfg.seed)
            picked.append(torch.stack([t[positions], p[positions]], 1))
            index.append(mosaic * pixels + positions)
            seen += 1

    views = {"served": model, "single": model.logits}
    matrices = split_confusion(model, shard_dir, "test", cfg.evaluate.batch_size, env, views, on_batch=sample_pixels)
    matrix, single_view = matrices["served"], matrices["single"]
    num_images = int(all_reduce_sum(torch.tensor([seen], device=collective_device())).item())
    sample = gather_in_order(torch.cat(picked), torch.cat(index))

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
            "actual": sample[:, 0].numpy(),
            "predicted": sample[:, 1].numpy(),
            **_segmentation_examples(model, shard_dir, env.device),
        }
    return {"metrics": metrics, "plots": plots}
