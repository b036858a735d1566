"""DVC stage register: models/{gan,segmenter} + metrics/*.json -> MLflow Model Registry + registry/<model>.json.

Registers one version of ``texture-gan`` and ``texture-segmenter`` linked to their training runs,
gates them (``register.*`` in params, and the current champion) and sets alias ``champion`` or
``challenger``. Re-running with the same models registers nothing new (same run + same weights ->
the existing version, gated again with the current params and its aliases moved to match), so the
stage is safe to repeat. Its records are DVC outputs with
``cache: false``: DVC never restores them from the run-cache, so a registration is never skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import config
from pipeline.checkpoint import atomic_write_json
from pipeline.errors import main_entry
from pipeline.gate import read_metrics
from pipeline.registry import register_model

STAGE = "register"


@main_entry(STAGE)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=config.PARAMS_FILE)
    parser.add_argument("--gan-model", default="models/gan", help="train_gan output directory")
    parser.add_argument("--segmenter-model", default="models/segmenter", help="train_segmenter output directory")
    parser.add_argument("--gan-metrics", default="metrics/gan.json")
    parser.add_argument("--segmenter-metrics", default="metrics/segmenter.json")
    parser.add_argument("--out", default="registry", help="directory for the registry records")
    ns = parser.parse_args(argv)
    cfg = config.load(ns.params)
    jobs = [("gan", ns.gan_model, ns.gan_metrics), ("segmenter", ns.segmenter_model, ns.segmenter_metrics)]
    metrics = {kind: read_metrics(Path(path), kind) for kind, _, path in jobs}  # both checked before registering
    for kind, model_dir, _ in jobs:
        record = register_model(cfg, kind, Path(model_dir), metrics[kind], dvc_stage=STAGE)
        atomic_write_json(Path(ns.out) / f"{record['model']}.json", record)
        status = "registered" if record["created"] else "already registered as"
        aliases = ", ".join(record["aliases"]) or "no alias"
        print(f"{record['model']}: {status} version {record['version']} ({aliases}): {record['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
