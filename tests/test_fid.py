"""FID/KID/precision-recall maths against float64 references, streaming stats, and 2-rank gloo reductions."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.distributed import gather_in_order
from pipeline.metrics.fid import (
    GaussianStats,
    diversity,
    diversity_ratio,
    fid_from_stats,
    frechet_distance,
    kid,
    precision_recall_coverage,
)


def _reference_fid(x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> float:
    """pytorch-fid's formula in float64 with scipy's sqrtm (and its eps offset for singular products)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _gaussian_pair(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d))) + 0.5
    return x, y


def _stats(x: np.ndarray) -> GaussianStats:
    s = GaussianStats(x.shape[1])
    s.update(torch.from_numpy(x))
    return s


@pytest.mark.parametrize(("n", "d"), [(600, 16), (2000, 64)])
def test_frechet_distance_matches_scipy_reference(n: int, d: int) -> None:
    x, y = _gaussian_pair(n, d, seed=d)
    ours = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert ours == pytest.approx(_reference_fid(x, y), rel=1e-6)
    assert fid_from_stats(_stats(x), _stats(y)) == pytest.approx(_reference_fid(x, y), rel=1e-6)


def test_frechet_distance_with_singular_covariances() -> None:
    x, y = _gaussian_pair(12, 32, seed=3)  # 12 samples in 32 dims: rank-11 covariances
    ours = fid_from_stats(_stats(x), _stats(y))
    assert math.isfinite(ours)
    assert ours == pytest.approx(_reference_fid(x, y), rel=1e-4)


def test_fid_of_a_set_with_itself_is_zero() -> None:
    x, _ = _gaussian_pair(500, 32, seed=1)
    assert fid_from_stats(_stats(x), _stats(x)) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_stats(_stats(x), _stats(x + 1.0)) == pytest.approx(32.0, rel=1e-9)  # mean shift only


def test_frechet_distance_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_streaming_stats_equal_one_shot_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(loc=3.0, scale=2.0, size=(1003, 24))
    stats = GaussianStats(24)
    for start in range(0, len(x), 7):
        stats.update(torch.from_numpy(x[start : start + 7]).float())  # float32 in, float64 sums
    x32 = x.astype(np.float32).astype(np.float64)
    assert stats.n == 1003
    np.testing.assert_allclose(stats.mean, x32.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-10)


def test_gaussian_stats_errors() -> None:
    stats = GaussianStats(4)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        stats.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="no samples"):
        _ = stats.mean
    stats.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.cov


def test_kid_matches_torchmetrics() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(5)
    real = torch.from_numpy(rng.normal(size=(300, 8)))
    fake = torch.from_numpy(rng.normal(loc=0.3, size=(250, 8)))
    with pytest.warns(UserWarning, match="save all extracted features"):
        metric = KernelInceptionDistance(feature=nn.Identity(), subsets=30, subset_size=100)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(11)  # torchmetrics draws its subsets from the global generator
    expected_mean, expected_std = metric.compute()
    mean, std = kid(real, fake, subsets=30, subset_size=100, seed=11)
    assert mean == pytest.approx(float(expected_mean), rel=1e-9)
    assert std == pytest.approx(float(expected_std), rel=1e-9)
    assert mean > 0


def test_kid_is_unbiased_on_one_distribution() -> None:
    rng = np.random.default_rng(6)
    real, fake = (torch.from_numpy(rng.normal(size=(2000, 16))) for _ in range(2))
    mean, std = kid(real, fake, subsets=50, subset_size=200, seed=0)
    # A biased (V-statistic) estimate would add about 2 E[k(x, x)] / m, with k(x, x) = (|x|^2 / d + 1)^3.
    bias = 2 * float((((real * real).sum(1) / 16 + 1) ** 3).mean()) / 200
    assert abs(mean) < 0.1 * bias
    assert kid(real, fake + 0.25, subsets=50, subset_size=200, seed=0)[0] > bias
    assert std > 0
    assert kid(real[:300], fake, subsets=5, subset_size=200, seed=1) == kid(real[:300], fake, 5, 200, seed=1)


def test_kid_caps_subset_size_at_the_smaller_set() -> None:
    real, fake = torch.randn(50, 4, dtype=torch.float64), torch.randn(80, 4, dtype=torch.float64)
    assert kid(real, fake, subsets=3, subset_size=1000, seed=0) == kid(real, fake, subsets=3, subset_size=50, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        kid(real[:1], fake, subsets=3, subset_size=10, seed=0)


def test_precision_recall_coverage_of_identical_sets() -> None:
    x = torch.from_numpy(np.random.default_rng(7).normal(size=(200, 8)))
    result = precision_recall_coverage(x, x.clone(), k=3)
    assert result == pytest.approx({"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0})


def _clusters(rng: np.random.Generator, per_class: int, classes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = rng.normal(scale=10.0, size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return torch.from_numpy(centres[labels] + rng.normal(size=(len(labels), dim))), torch.from_numpy(labels)


def test_collapsed_generator_has_precision_but_no_recall_or_diversity() -> None:
    rng = np.random.default_rng(8)
    real, labels = _clusters(rng, per_class=100, classes=4, dim=8)
    other, _ = _clusters(np.random.default_rng(8), per_class=100, classes=4, dim=8)  # same centres
    healthy = precision_recall_coverage(real, other + torch.from_numpy(rng.normal(scale=0.01, size=other.shape)), k=3)
    assert healthy["recall"] == pytest.approx(1.0) and healthy["precision"] == pytest.approx(1.0)
    # one sample per class, repeated: every generated image of a class is the same texture
    collapsed = real[labels * 100].clone()
    result = precision_recall_coverage(real, collapsed, k=3)
    assert result["precision"] == pytest.approx(1.0)
    assert result["recall"] < 0.05
    assert result["coverage"] < 0.05
    ratio = diversity_ratio(real, labels, collapsed, labels)
    assert ratio["mean"] == pytest.approx(0.0, abs=1e-6)
    assert diversity_ratio(real, labels, other, labels)["mean"] == pytest.approx(1.0, abs=0.1)


def test_diversity_is_mean_pairwise_distance() -> None:
    assert diversity(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least 2"):
        diversity(torch.zeros(1, 2))


def test_diversity_ratio_marks_unmeasurable_classes() -> None:
    real = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 5 + [1] * 4 + [2])
    ratio = diversity_ratio(real, labels, real, labels)
    assert ratio["per_class"][:2] == pytest.approx([1.0, 1.0])
    assert math.isnan(ratio["per_class"][2])
    assert ratio["mean"] == pytest.approx(1.0)


def test_gather_without_process_group_is_identity_or_sorted() -> None:
    x = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(gather_in_order(x), x)
    assert torch.equal(gather_in_order(x, torch.tensor([5, 4, 3, 2, 1, 0])), x.flip(0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fid_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = torch.load(Path(out_dir) / "data.pt")
        local_real, local_fake = data["real"][rank::world], data["fake"][rank::world]  # eval_batches' split
        real_stats, fake_stats = GaussianStats(local_real.shape[1]), GaussianStats(local_fake.shape[1])
        for start in range(0, local_real.shape[0], 5):
            real_stats.update(local_real[start : start + 5])
        fake_stats.update(local_fake)
        real_stats.all_reduce()
        fake_stats.all_reduce()
        result = {
            "n": real_stats.n,
            "mean": real_stats.mean,
            "cov": real_stats.cov,
            "fid": fid_from_stats(real_stats, fake_stats),
            "gathered": gather_in_order(local_real),
            "kid": kid(gather_in_order(local_real), gather_in_order(local_fake), 10, 40, seed=3),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    real = torch.from_numpy(rng.normal(size=(101, 6))).float()  # 101: ranks hold 51 and 50 samples
    fake = torch.from_numpy(rng.normal(loc=0.5, size=(77, 6))).float()
    torch.save({"real": real, "fake": fake}, tmp_path / "data.pt")
    mp.spawn(_fid_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    real_stats, fake_stats = GaussianStats(6), GaussianStats(6)
    real_stats.update(real)
    fake_stats.update(fake)
    expected_fid = fid_from_stats(real_stats, fake_stats)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["n"] == 101
        np.testing.assert_allclose(got["mean"], real_stats.mean, rtol=1e-12)
        np.testing.assert_allclose(got["cov"], real_stats.cov, rtol=1e-10, atol=1e-12)
        assert got["fid"] == pytest.approx(expected_fid, rel=1e-9)
        assert torch.equal(got["gathered"], real)
        assert got["kid"] == pytest.approx(kid(real, fake, 10, 40, seed=3), rel=1e-12)
