"""DVC stage ``prepare``: params.yaml -> WebDataset shards + manifest (``data/shards``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline import config
from pipeline.errors import main_entry


@main_entry("prepare")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prepare", description=__doc__)
    parser.add_argument("--params", default=config.PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("--out", default="data/shards", help="output directory (default: data/shards)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ns = parser.parse_args(argv)
    cfg = config.load(ns.params)
    from pipeline.data.prepare import prepare_dataset  # after the params check: a bad key fails without loading torch

    start = time.perf_counter()
    manifest = prepare_dataset(cfg, Path(ns.out), progress=not ns.no_progress)
    counts = ", ".join(
        f"{split} {kinds['patches']['samples']}/{kinds['mosaics']['samples']}"
        for split, kinds in manifest["splits"].items()
    )
    shards = sum(len(entry["shards"]) for kinds in manifest["splits"].values() for entry in kinds.values())
    skipped = f", {len(manifest['skipped'])} file(s) skipped" if manifest["skipped"] else ""
    print(
        f"prepare: {len(manifest['classes'])} classes, patches/mosaics {counts}, {shards} shards "
        f"in {ns.out}{skipped} ({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
