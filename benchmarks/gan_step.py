"""Time per GAN training step: the trainer's step (world size 1) vs a minimal plain PyTorch loop, and eager vs
``torch.compile`` (``--compile``).

Both run the same G and D (same initial weights), the same in-memory batch and the same non-saturating
loss, D update then G update (D frozen for it) then the EMA, interleaved in repeats so machine noise hits
both alike. The trainer's step adds what the training loop does every step: latents and augmentation
draws from a per-step seeded generator, metric reduction and the finite-loss check. Prints the
medians and minima and the overhead ratios (target <= 1.05) in wall-clock and in process CPU time; on
a shared machine use ``--threads 1`` and read the CPU-time minimum, the figure least disturbed by others.

``--compile``: the trainer's step as the loop runs it, with ``train.compile`` false and true (same weights, same
batch, the precision ``train.precision`` picks on this CPU), interleaved after warm-up steps: the compiled
variant's first steps compile its graphs, timed apart and left out of the speed-up (eager / compiled).

    python benchmarks/gan_step.py [--params params.yaml] [--steps 3] [--repeats 15] [--threads N] [--compile]
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
from pipeline.config import Config
from pipeline.distributed import DistEnv, all_reduce_mean, resolve_precision
from pipeline.engine import check_finite
from pipeline.training.gan import build_models
from pipeline.training.gan_loss import GanModels, GanStep, VaeStep

NUM_CLASSES = 10
COMPILE_WARMUP = 3  # steps before timing: the first compiles G and D, the next ones any graph a guard sends back


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


def trainer_step(cfg: Config, env: DistEnv, compiled: bool = False) -> tuple[Callable[[int], None], GanModels]:
    """The GAN step as the loop runs it (``gan.arch``'s step, then its metrics averaged over the ranks) on one
    fixed in-memory batch of this rank's ``gan.batch_size / world_size`` rows; ``compiled``: ``train.compile``.

    Returns ``step(i)`` and the models. On CUDA the batch is page-locked, as the training loader gives it.
    """
    gan, size = cfg.gan, cfg.data.patch_size
    models = build_models(gan, NUM_CLASSES, size, env, cfg.train.channels_last, cfg.seed, compiled)
    step_fn = (VaeStep if gan.arch == "vae" else GanStep)(
        gan, models, env, NUM_CLASSES, cfg.seed, cfg.train.channels_last
    )
    rows = gan.batch_size // env.world_size
    gen = torch.Generator().manual_seed(env.rank)
    batch = (torch.rand(rows, 3, size, size, generator=gen), torch.randint(0, NUM_CLASSES, (rows,), generator=gen))
    if env.device.type == "cuda":
        batch = tuple(t.pin_memory() for t in batch)
    reals = [batch] * gan.n_critic

    def step(i: int) -> None:
        values = step_fn(i, reals)
        all_reduce_mean({k: values[k] for k in step_fn.metrics}, env.device)

    return step, models


def compile_run(params: Path, steps: int = 3, repeats: int = 5, threads: int = 0) -> dict:
    """Eager vs compiled trainer step on the CPU: per variant the warm-up seconds, median and best ms/step (wall),
    and the speed-up eager / compiled."""
    if threads:
        torch.set_num_threads(threads)
    cfg = config.load(params)
    cpu = torch.device("cpu")
    env = DistEnv(0, 1, 0, cpu, "gloo", resolve_precision(cfg.train.precision, cpu))
    variants = {"eager": trainer_step(cfg, env)[0], "compiled": trainer_step(cfg, env, compiled=True)[0]}
    warmup_s = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        for i in range(COMPILE_WARMUP):
            fn(i)
        warmup_s[name] = time.perf_counter() - start
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for i in range(steps):
                fn(COMPILE_WARMUP + r * steps + i)
            timings[name].append((time.perf_counter() - start) / steps)
    med = {n: statistics.median(v) * 1000 for n, v in timings.items()}
    best = {n: min(v) * 1000 for n, v in timings.items()}
    gan = cfg.gan
    return {
        "setup": f"gan.arch {gan.arch}, batch {gan.batch_size}, channels {gan.channels}, {cfg.data.patch_size}px, "
        f"precision {str(env.amp_dtype or torch.float32).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
        f"{repeats} interleaved blocks of {steps} steps after {COMPILE_WARMUP} warm-up steps",
        "warmup_s": warmup_s,
        "median_ms": med,
        "best_ms": best,
        "speedup": {"median": med["eager"] / med["compiled"], "best": best["eager"] / best["compiled"]},
    }


def compile_report(result: dict) -> str:
    med, best, warm = result["median_ms"], result["best_ms"], result["warmup_s"]
    lines = [result["setup"]]
    for name in ("eager", "compiled"):
        lines.append(
            f"{name:>8}: median {med[name]:.1f} ms/step ({1000 / med[name]:.1f} steps/s), best {best[name]:.1f} ms; "
            f"warm-up {warm[name]:.1f} s"
        )
    sp = result["speedup"]
    lines.append(f"train.compile true / false, steps/s: median {sp['median']:.2f}x, best {sp['best']:.2f}x")
    return "\n".join(lines)


def run(params: Path, steps: int = 3, repeats: int = 15, threads: int = 0) -> dict:
    """Interleaved timings of both loops: per variant and clock, median and best ms/step, and the ratios."""
    if threads:
        torch.set_num_threads(threads)
    cfg = config.load(params, {"gan.loss": "ns", "gan.n_critic": 1, "gan.diffaug": [], "gan.r1_gamma": 0.0})
    gan, classes, size = cfg.gan, NUM_CLASSES, cfg.data.patch_size
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", None)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    ours_models = build_models(gan, classes, size, env, cfg.train.channels_last, cfg.seed)
    plain_models = build_models(gan, classes, size, env, cfg.train.channels_last, cfg.seed)
    ours = GanStep(gan, ours_models, env, classes, cfg.seed, cfg.train.channels_last)
    plain = plain_loop(plain_models, classes, gan.z_dim, gan.label_smoothing, fmt)
    gen = torch.Generator().manual_seed(0)
    reals = [(torch.rand(gan.batch_size, 3, size, size, generator=gen), torch.randint(0, classes, (gan.batch_size,)))]

    def ours_step(i: int, batch: list) -> None:
        check_finite(all_reduce_mean(ours(i, batch), env.device), i, Path("(no checkpoint in the benchmark)"))

    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    timings = {(name, clock): [] for name in ("trainer", "plain") for clock in clocks}
    variants = {"trainer": ours_step, "plain": plain}
    for fn in variants.values():  # warm-up
        for i in range(2):
            fn(i, reals)
    for r in range(repeats):
        for name, fn in variants.items():
            start = {clock: read() for clock, read in clocks.items()}
            for i in range(steps):
                fn(r * steps + i, reals)
            for clock, read in clocks.items():
                timings[name, clock].append((read() - start[clock]) / steps)
    med = {f"{n}_{c}": statistics.median(v) * 1000 for (n, c), v in timings.items()}
    best = {f"{n}_{c}": min(v) * 1000 for (n, c), v in timings.items()}
    return {
        "setup": f"G {sum(p.numel() for p in ours_models.g.parameters()):,} params, "
        f"D {sum(p.numel() for p in ours_models.d.parameters()):,} params, batch {gan.batch_size}, "
        f"{size}px, {torch.get_num_threads()} threads, channels_last={cfg.train.channels_last}, "
        f"{repeats} interleaved blocks of {steps} steps",
        "median_ms": med,
        "best_ms": best,
        "ratio": {
            clock: {
                "median": med[f"trainer_{clock}"] / med[f"plain_{clock}"],
                "best": best[f"trainer_{clock}"] / best[f"plain_{clock}"],
            }
            for clock in clocks
        },
        "target": 1.05,
    }


def report(result: dict) -> str:
    lines = [result["setup"]]
    med, best = result["median_ms"], result["best_ms"]
    for name in ("trainer", "plain"):
        lines.append(
            f"{name:>8}: median {med[name + '_wall']:.1f} ms/step wall, {med[name + '_cpu']:.1f} ms CPU; "
            f"best {best[name + '_wall']:.1f} ms wall, {best[name + '_cpu']:.1f} ms CPU"
        )
    for clock, r in result["ratio"].items():
        lines.append(
            f"overhead ratio trainer/plain ({clock}): median {r['median']:.3f}, best {r['best']:.3f} (target <= 1.05)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=config.PARAMS_FILE)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved blocks per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="train.compile false vs true instead")
    ns = parser.parse_args()
    if ns.compile:
        print(compile_report(compile_run(Path(ns.params), ns.steps, ns.repeats, ns.threads)))
    else:
        print(report(run(Path(ns.params), ns.steps, ns.repeats, ns.threads)))


if __name__ == "__main__":
    main()
