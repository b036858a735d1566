"""DVC stage evaluate: test-set metrics and plots for the GAN and the segmenter.

Writes the headline numbers to ``metrics/gan.json`` and ``metrics/segmenter.json`` and the per-class values
to bar-plot CSVs in ``plots/`` beside the images (rank 0), so ``dvc exp show`` stays readable; logs every value
(prefixed ``test_``), the whole evaluation (``evaluation/<model>_full.json``) and the plot files to the two
*training* runs in MLflow (run ids from ``models/*/run.json``). Runs as a plain process or under
``python -m pipeline.launch --nproc N``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline import config, plots
from pipeline.checkpoint import atomic_write_json
from pipeline.distributed import distributed
from pipeline.errors import UserError, main_entry
from pipeline.evaluation.generator import evaluate_gan
from pipeline.evaluation.segmenter import evaluate_segmenter
from pipeline.tracking import log_run_metrics, read_run_json, tracking_uri

SIGNIFICANT_DIGITS = 8  # well above the float32 noise a different rank count brings (~1e-7 relative)


def rounded(value: Any) -> Any:
    """Floats to :data:`SIGNIFICANT_DIGITS` significant digits (NaN -> None), recursively through dicts and lists."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    return value


def mlflow_metrics(metrics: dict[str, Any], prefix: str = "test_") -> dict[str, float]:
    """Numeric leaves as MLflow metrics: ``test_fid``, ``test_baselines/fid_real``, ``test_iou/stripes``, ..."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = prefix + re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key))
        if isinstance(value, dict):
            out |= mlflow_metrics(value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def split_per_class(metrics: dict[str, Any], classes: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The headline of ``metrics`` and its per-class values: every dict keyed by exactly ``classes``, at any
    depth, leaves the headline under its own key (``iou``, ``fid_per_class``, ``fid_per_class_real`` from
    ``baselines``, ``class_fidelity_per_class``)."""
    per_class: dict[str, dict[str, Any]] = {}

    def headline(node: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, dict) and set(value) == set(classes):
                per_class[key] = value
            else:
                out[key] = headline(value) if isinstance(value, dict) else value
        return out

    return headline(metrics), per_class


def _require(paths: list[Path]) -> None:
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: not found (run the stages before evaluate: dvc repro)")


def _log(
    cfg: config.Config, model_dir: Path, name: str, metrics: dict[str, Any], files: list[Path], shards: Path, kind: str
) -> None:
    """Every test metric, the whole evaluation as ``<name>_full.json``, ``files`` and the test split of ``kind``
    (the evaluation dataset) into the model's training run."""
    run_id = read_run_json(model_dir).get("run_id")
    if not isinstance(run_id, str):
        raise UserError(f"{model_dir / 'run.json'}: no run_id")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            full = Path(tmp) / f"{name}_full.json"
            atomic_write_json(full, metrics)
            log_run_metrics(cfg, run_id, mlflow_metrics(metrics), [full, *files], shards=shards, kind=kind)
    except UserError:
        raise
    except Exception as exc:  # MlflowException for an unknown run, connection errors for a server
        raise UserError(
            f"{model_dir / 'run.json'}: cannot log to MLflow run {run_id} at {tracking_uri(cfg)} ({type(exc).__name__})"
        ) from None


@main_entry("evaluate")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=config.PARAMS_FILE)
    parser.add_argument("--shards", default="data/shards", help="shard directory")
    parser.add_argument("--features", default="models/features/extractor.pt", help="FID feature extractor")
    parser.add_argument("--gan", default="models/gan", help="train_gan output directory")
    parser.add_argument("--segmenter", default="models/segmenter", help="train_segmenter output directory")
    parser.add_argument("--metrics-dir", default="metrics")
    parser.add_argument("--plots-dir", default="plots")
    ns = parser.parse_args(argv)
    cfg = config.load(ns.params)
    shards, gan_dir, seg_dir = Path(ns.shards), Path(ns.gan), Path(ns.segmenter)
    features = Path(ns.features)
    needed = [shards / "manifest.json", gan_dir / "generator.pt", gan_dir / "run.json"]
    needed += [seg_dir / "model.pt", seg_dir / "run.json"]
    _require(needed + ([features] if cfg.evaluate.fid_features == "texture" else []))

    with distributed(cfg.train) as env:
        gan = evaluate_gan(cfg, env, shards, gan_dir / "generator.pt", features)
        seg = evaluate_segmenter(cfg, env, shards, seg_dir / "model.pt")
        if not env.is_main:
            return 0
        metrics_dir, plots_dir = Path(ns.metrics_dir), Path(ns.plots_dir)
        gan_full, seg_full = rounded(gan["metrics"]), rounded(seg["metrics"])
        gan_metrics, gan_per_class = split_per_class(gan_full, gan["plots"]["classes"])
        seg_metrics, seg_per_class = split_per_class(seg_full, seg["plots"]["classes"])
        atomic_write_json(metrics_dir / "gan.json", gan_metrics)
        atomic_write_json(metrics_dir / "segmenter.json", seg_metrics)
        gan_files = plots.write_gan_plots(plots_dir, gan["plots"]) + plots.write_per_class_plots(
            plots_dir, gan_per_class
        )
        seg_files = plots.write_segmenter_plots(plots_dir, seg["plots"])
        seg_files += plots.write_per_class_plots(plots_dir, seg_per_class)
        _log(cfg, gan_dir, "gan", gan_full, gan_files, shards, "patches")
        _log(cfg, seg_dir, "segmenter", seg_full, seg_files, shards, "mosaics")
    base = gan_metrics["baselines"]
    print(
        f"GAN: FID {gan_metrics['fid']:.4g} (untrained {base['fid_untrained']:.4g}, real {base['fid_real']:.4g}), "
        f"KID {gan_metrics['kid_mean']:.4g}, recall {gan_metrics['recall']:.3f}, diversity {gan_metrics['diversity']}, "
        f"{gan_metrics['num_samples']} samples\n"
        f"segmenter: mIoU {seg_metrics['miou']:.4f}, pixel accuracy {seg_metrics['pixel_accuracy']:.4f} "
        f"on {seg_metrics['num_images']} test mosaics -> {metrics_dir}, {plots_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
