"""DVC stage train_gan: data/shards + models/features -> models/gan/ (best EMA generator), checkpoints/gan/.

Run under torchrun: ``python -m pipeline.launch --nproc N --max-restarts K stages/train_gan.py --params params.yaml``
(also runs as one plain process). Resumes from ``checkpoints/gan/last.pt`` automatically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import config
from pipeline.errors import main_entry
from pipeline.training.gan import train_gan


@main_entry("train_gan")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=config.PARAMS_FILE)
    parser.add_argument("--shards", default="data/shards", help="shard directory (input)")
    parser.add_argument("--features", default="models/features/extractor.pt", help="FID feature extractor (input)")
    parser.add_argument("--out", default="models/gan", help="output directory")
    parser.add_argument("--checkpoints", default="checkpoints/gan", help="resumable state directory")
    ns = parser.parse_args(argv)
    cfg = config.load(ns.params)
    train_gan(cfg, Path(ns.shards), Path(ns.features), Path(ns.out), Path(ns.checkpoints))
    return 0


if __name__ == "__main__":
    sys.exit(main())
