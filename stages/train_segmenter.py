"""DVC stage train_segmenter: data/shards -> models/segmenter/ (best U-Net by val mIoU), checkpoints/segmenter/.

Run under torchrun: ``python -m pipeline.launch --nproc N --max-restarts K stages/train_segmenter.py``
``--params params.yaml`` (also runs as one plain process). Resumes from ``checkpoints/segmenter/last.pt`` automatically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import config
from pipeline.errors import main_entry
from pipeline.training.segmenter import train_segmenter


@main_entry("train_segmenter")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=config.PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("--shards", default="data/shards", help="shard directory (input)")
    parser.add_argument("--out", default="models/segmenter", help="output directory")
    parser.add_argument("--checkpoints", default="checkpoints/segmenter", help="resumable state directory")
    ns = parser.parse_args(argv)
    cfg = config.load(ns.params)
    train_segmenter(cfg, Path(ns.shards), Path(ns.out), Path(ns.checkpoints))
    return 0


if __name__ == "__main__":
    sys.exit(main())
