"""Data-parallel scaling: the GAN training step and the evaluation's generate + feature pass, on 1 vs N ranks.

The same global batch (``gan.batch_size``) and the same number of evaluated samples on every world size,
so the ratio is the speed-up DDP buys on this machine (on a 2-core CPU expect <= 1: two gloo ranks
share the cores and add an all-reduce per step; on GPUs, one rank per GPU). Each world size is launched
with torchrun (gloo on CPU, NCCL on CUDA) ``--rounds`` times, alternating, and the best round is kept.

    python benchmarks/scaling.py [--params params.yaml] [--nproc 2] [--steps 30] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline import config
from pipeline.distributed import distributed
from pipeline.evaluation.generator import class_samples, generated_features
from pipeline.models.features import FeatureExtractor, TextureFeatureNet
from pipeline.training.gan import build_models
from pipeline.training.gan_loss import GanStep

NUM_CLASSES, WARMUP = 10, 3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def worker(params: Path, steps: int, out: Path) -> None:
    """One rank: time ``steps`` GAN steps and one evaluation pass; rank 0 writes the rates."""
    cfg = config.load(params)
    gan, size = cfg.gan, cfg.data.patch_size
    with distributed(cfg.train) as env:
        models = build_models(gan, NUM_CLASSES, size, env, cfg.train.channels_last, cfg.seed)
        step = GanStep(gan, models, env, NUM_CLASSES, cfg.seed, cfg.train.channels_last)
        rows = gan.batch_size // env.world_size
        gen = torch.Generator().manual_seed(env.rank)
        labels = torch.randint(0, NUM_CLASSES, (rows,), generator=gen)
        reals = [(torch.rand(rows, 3, size, size, generator=gen), labels)]
        for i in range(WARMUP):
            step(i, reals)
        _synchronize(env.device)
        start = time.perf_counter()
        for i in range(steps):
            step(WARMUP + i, reals)
        _synchronize(env.device)
        train_s = time.perf_counter() - start

        extractor = FeatureExtractor(TextureFeatureNet(NUM_CLASSES, cfg.evaluate.feature_dim)).to(env.device)
        generator = models.ema.module.eval()
        per_class = cfg.evaluate.samples_per_class
        batch = cfg.evaluate.batch_size
        z, labels = class_samples(NUM_CLASSES, cfg.evaluate.samples_per_class, generator.z_dim, cfg.seed, batch)
        generated_features(generator, extractor, z[: 2 * NUM_CLASSES], labels[: 2 * NUM_CLASSES], batch, env)  # warm-up
        _synchronize(env.device)
        start = time.perf_counter()
        generated_features(generator, extractor, z, labels, batch, env)
        _synchronize(env.device)
        eval_s = time.perf_counter() - start
        if env.is_main:
            result = {
                "world_size": env.world_size,
                "device": env.device.type,
                "train_samples_per_s": steps * gan.batch_size / train_s,
                "eval_images_per_s": NUM_CLASSES * per_class / eval_s,
            }
            out.write_text(json.dumps(result))


def launch(params: Path, nproc: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += [__file__, "--worker", "--params", str(params), "--steps", str(steps), "--out", str(out)]
        subprocess.run(cmd, check=True, env=os.environ | {"OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))})
        return json.loads(out.read_text())


def run(params: Path, nproc: int, steps: int, rounds: int) -> dict:
    """``{"1": best rates on 1 rank, "N": on N ranks, "train_scaling": N/1, "eval_scaling": N/1}``."""
    best: dict[int, dict] = {}
    for _ in range(rounds):
        for n in (1, nproc):
            r = launch(params, n, steps)
            if n not in best or r["train_samples_per_s"] > best[n]["train_samples_per_s"]:
                best[n] = r | {"eval_images_per_s": max(r["eval_images_per_s"], best.get(n, r)["eval_images_per_s"])}
    one, many = best[1], best[nproc]
    return {
        "1": one,
        str(nproc): many,
        "train_scaling": many["train_samples_per_s"] / one["train_samples_per_s"],
        "eval_scaling": many["eval_images_per_s"] / one["eval_images_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    parser.add_argument("--nproc", type=int, default=torch.cuda.device_count() if torch.cuda.is_available() else 2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        worker(ns.params, ns.steps, ns.out)
        return
    result = run(ns.params, ns.nproc, ns.steps, ns.rounds)
    n, one, many = ns.nproc, result["1"], result[str(ns.nproc)]
    print(
        f"GAN step ({one['device']}): 1 rank {one['train_samples_per_s']:.0f} samples/s, {n} ranks "
        f"{many['train_samples_per_s']:.0f} samples/s -> {n} ranks / 1 rank {result['train_scaling']:.2f}"
    )
    print(
        f"evaluation (generate + features): 1 rank {one['eval_images_per_s']:.0f} images/s, {n} ranks "
        f"{many['eval_images_per_s']:.0f} images/s -> {n} ranks / 1 rank {result['eval_scaling']:.2f}"
    )
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
