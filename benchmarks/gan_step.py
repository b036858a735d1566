"""Time per GAN training step: the trainer's step (world size 1) vs a minimal plain PyTorch loop.

Both run the same G and D (same initial weights), the same in-memory batch and the same non-saturating
loss, D update then G update (D frozen for it) then the EMA, interleaved in repeats so machine noise hits
both alike. The trainer's step adds what the training loop does every step: latents and augmentation
draws from a per-step seeded generator, metric reduction and the finite-loss check. Prints the
medians and minima and the overhead ratios (target <= 1.05) in wall-clock and in process CPU time; on
a shared machine use ``--threads 1`` and read the CPU-time minimum, the figure least disturbed by others.

    python benchmarks/gan_step.py [--params params.yaml] [--steps 3] [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import config
from pipeline.distributed import DistEnv
from pipeline.engine import check_finite
from pipeline.training.gan import GanModels, GanStep, build_models, reduce_metrics


def plain_loop(m: GanModels, num_classes: int, z_dim: int, smoothing: float, fmt: torch.memory_format) -> Callable:
    """The textbook conditional DCGAN step (PyTorch DCGAN example), plus the same EMA update."""
    g, d = m.g, m.d

    def step(i: int, reals: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        images, labels = reals[0]
        real = images.to(memory_format=fmt).mul(2).sub(1)
        z = torch.randn(real.shape[0], z_dim)
        y = torch.randint(0, num_classes, (real.shape[0],))
        fake = g(z, y)
        m.opt_d.zero_grad(set_to_none=True)
        out_real, out_fake = d(real, labels), d(fake.detach(), y)
        loss_d = F.binary_cross_entropy_with_logits(out_real, torch.full_like(out_real, 1 - smoothing))
        loss_d = loss_d + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake))
        loss_d.backward()
        m.opt_d.step()
        d.requires_grad_(False)
        m.opt_g.zero_grad(set_to_none=True)
        out = d(fake, y)
        F.binary_cross_entropy_with_logits(out, torch.ones_like(out)).backward()
        m.opt_g.step()
        d.requires_grad_(True)
        m.ema.update(g, i)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=config.PARAMS_FILE)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved blocks per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    cfg = config.load(Path(ns.params), {"gan.loss": "ns", "gan.n_critic": 1, "gan.diffaug": [], "gan.r1_gamma": 0.0})
    gan, classes, size = cfg.gan, 10, cfg.data.patch_size
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", None)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    ours_models = build_models(gan, classes, size, env, cfg.train.channels_last, cfg.seed)
    plain_models = build_models(gan, classes, size, env, cfg.train.channels_last, cfg.seed)
    ours = GanStep(gan, ours_models, env, classes, cfg.seed, cfg.train.channels_last)
    plain = plain_loop(plain_models, classes, gan.z_dim, gan.label_smoothing, fmt)
    gen = torch.Generator().manual_seed(0)
    reals = [(torch.rand(gan.batch_size, 3, size, size, generator=gen), torch.randint(0, classes, (gan.batch_size,)))]

    def ours_step(i: int, batch: list) -> None:
        check_finite(reduce_metrics(ours(i, batch), 1), i, Path("(no checkpoint in the benchmark)"))

    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    timings = {(name, clock): [] for name in ("trainer", "plain") for clock in clocks}
    variants = {"trainer": ours_step, "plain": plain}
    for fn in variants.values():  # warm-up
        for i in range(2):
            fn(i, reals)
    for r in range(ns.repeats):
        for name, fn in variants.items():
            start = {clock: read() for clock, read in clocks.items()}
            for i in range(ns.steps):
                fn(r * ns.steps + i, reals)
            for clock, read in clocks.items():
                timings[name, clock].append((read() - start[clock]) / ns.steps)
    med = {k: statistics.median(v) * 1000 for k, v in timings.items()}
    best = {k: min(v) * 1000 for k, v in timings.items()}
    print(
        f"G {sum(p.numel() for p in ours_models.g.parameters()):,} params, "
        f"D {sum(p.numel() for p in ours_models.d.parameters()):,} params, batch {gan.batch_size}, "
        f"{size}px, {torch.get_num_threads()} threads, channels_last={cfg.train.channels_last}, "
        f"{ns.repeats} interleaved blocks of {ns.steps} steps"
    )
    for name in variants:
        print(
            f"{name:>8}: median {med[name, 'wall']:.1f} ms/step wall, {med[name, 'cpu']:.1f} ms CPU; "
            f"best {best[name, 'wall']:.1f} ms wall, {best[name, 'cpu']:.1f} ms CPU"
        )
    for clock in clocks:
        ratios = (med["trainer", clock] / med["plain", clock], best["trainer", clock] / best["plain", clock])
        print(f"overhead ratio trainer/plain ({clock}): median {ratios[0]:.3f}, best {ratios[1]:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
