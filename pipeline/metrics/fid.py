"""FID, KID, precision/recall/density/coverage and diversity on feature vectors (float64, distributed).

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to two feature sets. The
  statistics stream (:class:`GaussianStats`: n, sum and sum of outer products in float64), so memory
  does not grow with the number of samples, and they add up across ranks.
- KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel over random subsets,
  the same estimator as torchmetrics' ``KernelInceptionDistance``.
- Improved precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020) from
  k-nearest-neighbour balls, as in the ``prdc`` reference code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.distributed import all_reduce_sum, collective_device

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
_CHUNK = 1024  # rows per distance block: memory stays at _CHUNK x N


class GaussianStats:
    """Streaming mean and covariance of ``dim``-d features in float64; memory is O(dim²)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._n = 0
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        """Add a (B, dim) batch."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {tuple(features.shape)}")
        f = features.detach().to("cpu", torch.float64)
        self._n += f.shape[0]
        self._sum += f.sum(0)
        self._outer += f.T @ f

    def all_reduce(self) -> None:
        """Sum n, sum and outer sums over every rank (a no-op without a process group)."""
        packed = torch.cat([torch.tensor([float(self._n)], dtype=torch.float64), self._sum, self._outer.flatten()])
        packed = all_reduce_sum(packed.to(collective_device())).cpu()
        self._n = round(packed[0].item())
        self._sum = packed[1 : 1 + self.dim].clone()
        self._outer = packed[1 + self.dim :].reshape(self.dim, self.dim).clone()

    @property
    def n(self) -> int:
        return self._n

    @property
    def mean(self) -> np.ndarray:
        if self._n < 1:
            raise ValueError("GaussianStats: no samples")
        return (self._sum / self._n).numpy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1, like ``np.cov``)."""
        if self._n < 2:
            raise ValueError(f"GaussianStats: a covariance needs at least 2 samples, got {self._n}")
        mean = self._sum / self._n
        cov = (self._outer - self._n * torch.outer(mean, mean)) / (self._n - 1)
        return ((cov + cov.T) / 2).numpy()


def _symmetric(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½) in float64.

    tr((S1 S2)^½) = Σ sqrt(eig(S1^½ S2 S1^½)): for PSD S1, S2 that matrix is symmetric PSD, so
    ``eigh`` is stable and real. Rank-deficient covariances (fewer samples than dimensions, dead
    features) need neither sqrtm's complex round-off clean-up nor pytorch-fid's eps offset: round-off
    eigenvalues below zero are clipped.
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (_symmetric(np.atleast_2d(np.asarray(s, dtype=np.float64))) for s in (sigma1, sigma2))
    if not (mu1.shape == mu2.shape and s1.shape == s2.shape == (mu1.size, mu1.size)):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("frechet_distance: non-finite mean or covariance")
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = np.linalg.eigvalsh(_symmetric(root1 @ s2 @ root1))
    tr_covmean = float(np.sqrt(np.clip(inner, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)  # a distance; only round-off makes it negative


def fid_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def _poly_mmd2(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD² with k(a, b) = (a·b / d + 1)³ for equal-size subsets."""
    m = x.shape[0]
    gamma = 1.0 / x.shape[1]
    k_xx = (x @ x.T * gamma + 1.0) ** 3
    k_yy = (y @ y.T * gamma + 1.0) ** 3
    k_xy = (x @ y.T * gamma + 1.0) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / m**2)


def kid(
    real: Tensor, fake: Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD² over ``subsets`` random subsets.

    ``subset_size`` is capped at the smaller set; subsets are drawn as torchmetrics does (a real then
    a fake permutation per subset), from a generator seeded with ``seed``. std is the population std.
    """
    real, fake = _as_features(real), _as_features(fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {real.shape[0]} and {fake.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(real.shape[0], generator=gen)[:m]]
        f = fake[torch.randperm(fake.shape[0], generator=gen)[:m]]
        scores.append(_poly_mmd2(r, f))
    values = np.asarray(scores)
    return float(values.mean()), float(values.std())


def _as_features(x: Tensor | np.ndarray) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 2:
        raise ValueError(f"expected features of shape (N, dim), got {tuple(t.shape)}")
    return t


def _distance_blocks(x: Tensor, y: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """(rows, distances from x[rows] to every y) in blocks of _CHUNK rows."""
    for start in range(0, x.shape[0], _CHUNK):
        rows = slice(start, min(start + _CHUNK, x.shape[0]))
        # Exact differences, not the matrix-product shortcut: d(a, b) is then bit-identical whichever set
        # a and b come from, so a sample never drifts across the edge of its own neighbour's ball.
        yield rows, torch.cdist(x[rows], y, compute_mode="donot_use_mm_for_euclid_dist")


def _kth_neighbour_distance(x: Tensor, k: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row (itself excluded)."""
    if x.shape[0] <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples, got {x.shape[0]}")
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for rows, d in _distance_blocks(x, x):
        out[rows] = d.kthvalue(k + 1, dim=1).values  # the smallest is the row itself (0)
    return out


def precision_recall_coverage(real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision/recall and density/coverage of ``fake`` against ``real`` with k-NN balls.

    precision: fakes inside some real ball; recall: reals inside some fake ball; density: fakes'
    mean count of real balls they fall in, over k; coverage: reals whose ball holds some fake.
    """
    real, fake = _as_features(real), _as_features(fake)
    real_radius = _kth_neighbour_distance(real, k)
    fake_radius = _kth_neighbour_distance(fake, k)
    in_real_balls = torch.empty(fake.shape[0], dtype=torch.float64)  # per fake: how many real balls
    recalled = torch.zeros(real.shape[0], dtype=torch.bool)
    nearest_fake = torch.full((real.shape[0],), math.inf, dtype=torch.float64)
    for rows, d in _distance_blocks(fake, real):
        in_real_balls[rows] = (d < real_radius[None, :]).sum(1).to(torch.float64)
        recalled |= (d < fake_radius[rows, None]).any(0)
        nearest_fake = torch.minimum(nearest_fake, d.min(0).values)
    covered = nearest_fake < real_radius
    return {
        "precision": float((in_real_balls > 0).to(torch.float64).mean()),
        "recall": float(recalled.to(torch.float64).mean()),
        "density": float(in_real_balls.mean() / k),
        "coverage": float(covered.to(torch.float64).mean()),
    }


def diversity(features: Tensor) -> float:
    """Mean Euclidean distance over all pairs of distinct samples."""
    x = _as_features(features)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {n}")
    total = sum(float(d.sum()) for _, d in _distance_blocks(x, x))
    return total / (n * (n - 1))


def diversity_ratio(real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor) -> dict[str, Any]:
    """Per class diversity(fake) / diversity(real); ``mean`` over classes with >= 2 samples on both sides.

    Near 1: generated samples of a class vary as much as real ones; near 0: mode collapse.
    ``per_class`` has NaN for classes that cannot be measured.
    """
    real, fake = _as_features(real), _as_features(fake)
    real_labels, fake_labels = torch.as_tensor(real_labels).cpu(), torch.as_tensor(fake_labels).cpu()
    classes = int(max(real_labels.max(), fake_labels.max())) + 1
    ratios = []
    for c in range(classes):
        r, f = real[real_labels == c], fake[fake_labels == c]
        ratios.append(diversity(f) / diversity(r) if min(r.shape[0], f.shape[0]) >= 2 else math.nan)
    measured = [x for x in ratios if not math.isnan(x)]
    return {"mean": float(np.mean(measured)) if measured else math.nan, "per_class": ratios}
