"""``python -m pipeline models``: every model family, the param that selects it, its size at the given params."""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.config import Config, DataConfig
from pipeline.data.sources import BUILTIN_CLASSES, _folder_classes, folder_root
from pipeline.models.gan import GENERATORS, discriminator_from_config, encoder_from_config, generator_from_config
from pipeline.models.segmenters import SEGMENTERS, segmenter_from_config

COLUMNS = ("kind", "family", "selected_by", "in_use", "parameters")


def num_classes(data: DataConfig) -> int:
    """How many classes the ``data`` section selects (``data.classes``, or every class of the source)."""
    if data.classes:
        return len(data.classes)
    if data.source == "builtin":
        return len(BUILTIN_CLASSES)
    return len(_folder_classes(folder_root(data.folder)))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_models(cfg: Config) -> list[dict[str, Any]]:
    """One row per model family and trained model: ``kind`` (segmenter; generator, and the discriminator or
    encoder trained beside it), ``family``, ``selected_by`` (the param setting that picks it), ``in_use``
    (whether ``cfg`` picks it) and ``parameters`` (the model's parameter count at ``cfg``)."""
    classes = num_classes(cfg.data)
    rows = [
        {
            "kind": "segmenter",
            "family": arch,
            "selected_by": f"segmenter.arch={arch}",
            "in_use": arch == cfg.segmenter.arch,
            "parameters": _count(segmenter_from_config(cfg.segmenter, classes, arch)),
        }
        for arch in SEGMENTERS
    ]
    gan, size = cfg.gan, cfg.data.patch_size
    for arch in GENERATORS:
        models = {
            "generator": generator_from_config(gan, classes, size, arch),
            "discriminator": discriminator_from_config(gan, classes, size, arch),
            "encoder": encoder_from_config(gan, classes, size, arch),
        }
        for kind, model in models.items():
            if model is not None:
                row = {"kind": kind, "family": arch, "selected_by": f"gan.arch={arch}", "in_use": arch == gan.arch}
                rows.append(row | {"parameters": _count(model)})
    return rows


def format_models(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (``*`` marks the families in use)."""
    cells = [list(COLUMNS)] + [
        [r["kind"], r["family"], r["selected_by"], "*" if r["in_use"] else "", f"{r['parameters']:,}"] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i == len(COLUMNS) - 1 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
    return "\n".join(lines)
