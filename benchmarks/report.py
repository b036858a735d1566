"""`make bench`: run every benchmark and write their ratios as one table (Markdown + JSON) with the machine.

Every figure is a ratio of two things measured side by side in the same run (machines are noisy;
absolute times are not stable). The README shows the latest ``benchmarks/results.md``.

    python benchmarks/report.py [--params params.yaml] [--out benchmarks/results] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

import gan_step
import loader
import scaling

from pipeline import config
from pipeline.checkpoint import atomic_write_json, atomic_write_text


def machine() -> str:
    if torch.cuda.is_available():
        gpus = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        gpus = ", no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores{gpus}, torch {torch.__version__}, {platform.system()}"


def rows(results: dict) -> list[tuple[str, str, str]]:
    """(what, ratio, details) per line of the table."""
    ld, gs, sc, gc = results["loader"], results["gan_step"], results["scaling"], results["gan_compile"]
    rate = ld["samples_per_s"]
    n = next(k for k in sc if k.isdigit() and k != "1")
    one, many = sc["1"], sc[n]
    return [
        (
            "loader: webdataset shards / one PNG file per sample, warm page cache",
            f"{ld['ratio']['warm']:.2f}x",
            f"{rate['warm']['webdataset']:.0f} vs {rate['warm']['per-file']:.0f} samples/s",
        ),
        (
            "loader: same, cold cache (files evicted before each pass)",
            f"{ld['ratio']['cold']:.2f}x",
            f"{rate['cold']['webdataset']:.0f} vs {rate['cold']['per-file']:.0f} samples/s",
        ),
        (
            "GAN step: our trainer / minimal plain PyTorch loop (CPU time, best)",
            f"{gs['ratio']['cpu']['best']:.3f}",
            f"target <= {gs['target']}; wall median {gs['ratio']['wall']['median']:.3f}",
        ),
        (
            "GAN step: train.compile true / false, steps/s (median, compiling excluded)",
            f"{gc['speedup']['median']:.2f}x",
            f"{gc['median_ms']['compiled']:.1f} vs {gc['median_ms']['eager']:.1f} ms/step; "
            f"compiling took {gc['warmup_s']['compiled']:.0f} s",
        ),
        (
            f"GAN training: {n} ranks / 1 rank, same global batch",
            f"{sc['train_scaling']:.2f}x",
            f"{many['train_samples_per_s']:.0f} vs {one['train_samples_per_s']:.0f} samples/s ({one['device']})",
        ),
        (
            f"evaluation (generate + FID features): {n} ranks / 1 rank",
            f"{sc['eval_scaling']:.2f}x",
            f"{many['eval_images_per_s']:.0f} vs {one['eval_images_per_s']:.0f} images/s",
        ),
    ]


def markdown(results: dict) -> str:
    lines = [
        f"Measured {results['date']} on {results['machine']}.",
        "",
        "| benchmark | ratio | details |",
        "|---|---|---|",
        *(f"| {what} | {ratio} | {details} |" for what, ratio, details in rows(results)),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="writes OUT.md and OUT.json")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisier ratios)")
    ns = parser.parse_args()
    repeats = 1 if ns.quick else 3
    nproc = torch.cuda.device_count() if torch.cuda.is_available() else 2
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "loader": loader.run(64, 1, repeats, None),
        "gan_step": gan_step.run(ns.params, steps=3, repeats=5 * repeats),
        "gan_compile": gan_step.compile_run(ns.params, steps=3, repeats=3 * repeats),
        "scaling": scaling.run(ns.params, max(nproc, 2), steps=10 * repeats, rounds=1 if ns.quick else 2),
    }
    text = markdown(results)
    atomic_write_text(ns.out.with_suffix(".md"), text)
    atomic_write_json(ns.out.with_suffix(".json"), results)
    print(text, end="")
    print(f"written: {ns.out.with_suffix('.md')}, {ns.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
