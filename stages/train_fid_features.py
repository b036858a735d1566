"""DVC stage train_fid_features: data/shards -> models/features/{extractor.pt,extractor.json}, checkpoints/features/."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline import config
from pipeline.errors import main_entry
from pipeline.training.features import train_feature_extractor


@main_entry("train_fid_features")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=config.PARAMS_FILE)
    parser.add_argument("--shards", default="data/shards", help="shard directory (input)")
    parser.add_argument("--out", default="models/features", help="output directory")
    parser.add_argument("--checkpoints", default="checkpoints/features", help="resumable state directory")
    ns = parser.parse_args(argv)
    cfg = config.load(ns.params)
    start = time.perf_counter()
    summary = train_feature_extractor(
        cfg, Path(ns.shards), Path(ns.out), Path(ns.checkpoints), progress=sys.stderr.isatty()
    )
    print(
        f"feature extractor: test accuracy {summary['test_accuracy']:.3f} on {summary['test_samples']} patches, "
        f"{summary['steps']} steps in {time.perf_counter() - start:.0f} s -> {Path(ns.out)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
