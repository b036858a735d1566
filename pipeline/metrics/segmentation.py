"""Segmentation metrics from a confusion matrix (as in torchvision's references/segmentation/utils.py)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pipeline.distributed import all_reduce_sum, collective_device

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Pixel counts ``mat[truth, prediction]``, summed over updates and (optionally) over ranks."""

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add integer class maps of equal shape; target pixels equal to ``ignore_index`` are skipped."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred, target = pred.detach().flatten().cpu().long(), target.detach().flatten().cpu().long()
        keep = target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=bool)
        pred, target = pred[keep], target[keep]
        n = self.num_classes
        for name, t in (("pred", pred), ("target", target)):
            if t.numel() and (t.min() < 0 or t.max() >= n):
                raise ValueError(f"{name} has class indices outside [0, {n}): {t.min().item()}..{t.max().item()}")
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def reduce_from_all_processes(self) -> None:
        """Sum the matrix over every rank (a no-op without a process group)."""
        self.mat = all_reduce_sum(self.mat.to(collective_device())).cpu()

    def compute(self) -> dict[str, Any]:
        """``iou`` per class (NaN where a class is in neither prediction nor truth; see ``present``),
        ``miou`` (mean over present classes), ``pixel_accuracy`` and ``confusion`` (rows: truth)."""
        mat = self.mat.to(torch.float64)
        tp = mat.diagonal()
        union = mat.sum(0) + mat.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        total = mat.sum()
        return {
            "iou": iou.tolist(),
            "present": present.tolist(),
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
            "confusion": self.mat.tolist(),
        }
