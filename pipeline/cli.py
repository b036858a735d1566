"""``python -m pipeline <command>``: dataset checks, FID between folders, and model use from the registry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import main_entry

PROG = "python -m pipeline"


def _verify_shards(ns: argparse.Namespace) -> int:
    from pipeline.data.shards import verify_shards

    problems = verify_shards(Path(ns.dir))
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {ns.dir}", file=sys.stderr)
        return 1
    print(f"{ns.dir}: all shards match the manifest")
    return 0


def _fid(ns: argparse.Namespace) -> int:
    from pipeline.evaluation.generator import fid_between_folders

    result = fid_between_folders(
        Path(ns.dir_a), Path(ns.dir_b), features=ns.features, batch_size=ns.batch_size, device=ns.device
    )
    print(json.dumps(result, indent=2) if ns.json else f"FID: {result['fid']:.4f}")
    return 0


def _generate(ns: argparse.Namespace) -> int:
    from pipeline.use import generate_to_folder

    written = generate_to_folder(ns.model_uri, ns.classes, ns.num, ns.seed, Path(ns.out))
    print(f"wrote {len(written)} images to {ns.out}")
    return 0


def _segment(ns: argparse.Namespace) -> int:
    from pipeline.use import segment_to_folder

    written = segment_to_folder(ns.model_uri, [Path(p) for p in ns.inputs], Path(ns.out))
    print(f"wrote {len(written)} masks to {ns.out}")
    return 0


def _models(ns: argparse.Namespace) -> int:
    from pipeline import config
    from pipeline.models.catalog import describe_models, format_models

    print(format_models(describe_models(config.load(ns.params))))
    return 0


def _promote(ns: argparse.Namespace) -> int:
    from pipeline import config

    cfg = config.load(ns.params)
    from pipeline.registry import promote

    print(promote(cfg, ns.model, ns.version, ns.alias, ns.force))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("verify-shards", help="check every shard against the manifest (sha256, counts, decoding)")
    p.add_argument("dir", nargs="?", default="data/shards", help="shard directory (default: data/shards)")
    p.set_defaults(func=_verify_shards)

    p = sub.add_parser("fid", help="FID/KID between two folders of images (like pytorch-fid)")
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.add_argument(
        "--features",
        default="models/features/extractor.pt",
        help="texture feature extractor file, or 'inception' (needs the [inception] extra)",
    )
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print every statistic as JSON")
    p.set_defaults(func=_fid)

    p = sub.add_parser("models", help="every model family, the param that selects it, its size at the params")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_models)

    p = sub.add_parser("generate", help="sample texture patches from a registered GAN")
    p.add_argument("--model-uri", default="models:/texture-gan@champion")
    p.add_argument("--classes", nargs="+", required=True, help="class names (or indices)")
    p.add_argument("--num", type=int, default=8, help="images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_generate)

    p = sub.add_parser("segment", help="label every pixel of images with a registered segmenter")
    p.add_argument("inputs", nargs="+", help="image files")
    p.add_argument("--model-uri", default="models:/texture-segmenter@champion")
    p.add_argument("--out", required=True, help="output folder for masks")
    p.set_defaults(func=_segment)

    p = sub.add_parser("promote", help="move an alias to a model version, gated like the register stage")
    p.add_argument("model", choices=["texture-gan", "texture-segmenter"])
    p.add_argument("--version", help="version to promote (default: the latest)")
    p.add_argument("--alias", default="champion")
    p.add_argument("--force", action="store_true", help="skip the metric gate and the champion comparison")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_promote)
    return parser


@main_entry(PROG)
def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)
