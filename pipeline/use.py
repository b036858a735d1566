"""Using registered models from the CLI: ``python -m pipeline generate`` and ``python -m pipeline segment``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.checkpoint import atomic_write_bytes
from pipeline.errors import UserError
from pipeline.images import colorize, png_bytes
from pipeline.registry import load_pyfunc
from pipeline.serving import resolve_class


def generate_to_folder(model_uri: str, classes: list[str], n: int, seed: int, out_dir: Path) -> list[Path]:
    """``n`` images per class (seeds ``seed .. seed+n-1``) from a registered GAN -> ``out_dir/<class>_NNNN.png``."""
    if n < 1:
        raise UserError(f"--num: expected a positive number of images per class, got {n}")
    model = load_pyfunc(model_uri)
    known = list(model.metadata.metadata["classes"])
    names = [known[resolve_class(c, known)] for c in classes]
    table = pd.DataFrame(
        {"class": [name for name in names for _ in range(n)], "seed": [seed + i for _ in names for i in range(n)]}
    )
    images = model.predict(table)
    written = []
    for (name, index), image in zip(((name, i) for name in names for i in range(n)), images, strict=True):
        path = Path(out_dir) / f"{name}_{index:04d}.png"
        atomic_write_bytes(path, png_bytes(image))
        written.append(path)
    return written


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB; a :class:`UserError` naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def segment_to_folder(model_uri: str, inputs: list[Path], out_dir: Path) -> list[Path]:
    """Label every pixel of ``inputs`` with a registered segmenter.

    Writes ``out_dir/<stem>.mask.png`` (8-bit class indices) and ``out_dir/<stem>.preview.png``
    (input and the mask in the class palette of the DVC plots, side by side); returns the mask paths.
    """
    stems = [Path(p).stem for p in inputs]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise UserError(f"inputs: several files named {duplicates[0]!r} would write the same mask")
    images = [read_rgb(Path(p)) for p in inputs]
    model = load_pyfunc(model_uri)
    classes = list(model.metadata.metadata["classes"])
    if len(classes) > 256:
        raise UserError(f"{model_uri}: {len(classes)} classes do not fit an 8-bit mask")
    written = []
    for stem, image in zip(stems, images, strict=True):
        mask = np.asarray(model.predict(image[None]))[0].astype(np.uint8)
        path = Path(out_dir) / f"{stem}.mask.png"
        atomic_write_bytes(path, png_bytes(mask))
        preview = np.concatenate([image, colorize(mask, len(classes))], 1)
        atomic_write_bytes(path.with_name(f"{stem}.preview.png"), png_bytes(preview))
        written.append(path)
    return written
