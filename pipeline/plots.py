"""Evaluation plots: PNGs rendered with PIL and CSVs for ``dvc plots`` (every file written atomically).

- ``gan_samples.png``: one row per class (name in the left margin): real test patches, then generated ones.
- ``confusion_matrix.png``: the test confusion matrix, row-normalised (each row: where that class's
  pixels went), class names on both axes.
- ``segmentation_examples.png``: the first test mosaics as image | truth | prediction, with a colour legend.
- ``<key>.csv`` for each per-class value of the evaluation (``iou.csv``, ``fid_per_class.csv``,
  ``fid_per_class_real.csv``, ``diversity_per_class.csv``, ...): ``class,<key>`` rows for horizontal bar
  plots, the per-class detail kept out of ``metrics/*.json``; a class without a value (absent from truth and
  prediction, too few samples) is left out.
- ``confusion.csv``: ``actual,predicted`` class names for DVC's ``confusion`` template, one row per pixel
  of a deterministic stratified uniform sample of test pixels (``evaluation.CONFUSION_SAMPLES`` in all,
  an equal share per mosaic; see :func:`pipeline.evaluation.pixel_sample`), not every pixel.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.checkpoint import atomic_write_bytes, atomic_write_text
from pipeline.images import colorize, palette, png_bytes

GAN_SAMPLES = "gan_samples.png"
CONFUSION_PNG = "confusion_matrix.png"
SEGMENTATION_EXAMPLES = "segmentation_examples.png"
CONFUSION_CSV = "confusion.csv"

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
GAP = 4
FONT_SIZE = 12


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(font: Any, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _write_png(path: Path, image: Image.Image) -> Path:
    atomic_write_bytes(path, png_bytes(np.asarray(image)))
    return path


def _scaled(array: np.ndarray, scale: int) -> Image.Image:
    """A uint8 (H, W, 3) array enlarged ``scale`` times with nearest neighbours (pixels stay visible)."""
    return Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.Resampling.NEAREST)


def sample_grid_image(
    classes: Sequence[str], real: Sequence[np.ndarray], generated: Sequence[np.ndarray], scale: int = 2
) -> Image.Image:
    """One row per class: its name, its real patches, a gap, its generated patches (uint8 (k, H, W, 3) each)."""
    font = _font()
    side = max(a.shape[1] for a in [*real, *generated] if a.size) * scale
    n_real, n_fake = max(len(a) for a in real), max(len(a) for a in generated)
    margin = max(_text_size(font, name)[0] for name in classes) + 2 * GAP
    header = _text_size(font, "generated")[1] + 2 * GAP
    fake_x = margin + n_real * (side + GAP) + 3 * GAP
    width = fake_x + n_fake * (side + GAP)
    canvas = Image.new("RGB", (width, header + len(classes) * (side + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, GAP), "real (test)", fill=INK, font=font)
    draw.text((fake_x, GAP), "generated", fill=INK, font=font)
    for row, name in enumerate(classes):
        y = header + row * (side + GAP)
        draw.text((GAP, y + (side - _text_size(font, name)[1]) // 2), name, fill=INK, font=font)
        for x0, patches in ((margin, real[row]), (fake_x, generated[row])):
            for i, patch in enumerate(patches):
                canvas.paste(_scaled(patch, scale), (x0 + i * (side + GAP), y))
    return canvas


def row_normalised(matrix: Sequence[Sequence[int]]) -> np.ndarray:
    """Each row divided by its sum (a row without pixels stays 0)."""
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def confusion_image(classes: Sequence[str], matrix: Sequence[Sequence[int]], cell: int = 40) -> Image.Image:
    """Row-normalised confusion matrix: rows = actual class, columns = predicted class, shares in the cells."""
    font = _font()
    norm = row_normalised(matrix)
    n = len(classes)
    label_w = max(_text_size(font, name)[0] for name in classes) + 2 * GAP
    title_h = _text_size(font, "predicted")[1] + 2 * GAP
    left, top = label_w + title_h, label_w + title_h
    canvas = Image.new("RGB", (left + n * cell + GAP, top + n * cell + GAP), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((left, GAP), "predicted", fill=INK, font=font)
    actual = Image.new("RGB", (_text_size(font, "actual")[0] + 2 * GAP, title_h), BACKGROUND)
    ImageDraw.Draw(actual).text((GAP, GAP), "actual", fill=INK, font=font)
    canvas.paste(actual.rotate(90, expand=True), (GAP, top))
    for i, name in enumerate(classes):
        w, h = _text_size(font, name)
        draw.text((left - w - GAP, top + i * cell + (cell - h) // 2), name, fill=INK, font=font)
        label = Image.new("RGB", (label_w, h + 2 * GAP), BACKGROUND)
        ImageDraw.Draw(label).text((GAP, GAP), name, fill=INK, font=font)
        canvas.paste(label.rotate(90, expand=True), (left + i * cell + (cell - h) // 2 - GAP, title_h))
        for j in range(n):
            v = float(norm[i, j])
            colour = tuple(round(255 - v * (255 - c)) for c in (8, 48, 107))  # white -> dark blue
            x, y = left + j * cell, top + i * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=(200, 200, 200))
            text = f"{v:.2f}"
            tw, th = _text_size(font, text)
            draw.text(
                (x + (cell - tw) // 2, y + (cell - th) // 2), text, fill=INK if v < 0.5 else BACKGROUND, font=font
            )
    return canvas


def segmentation_examples_image(
    classes: Sequence[str], images: np.ndarray, truth: np.ndarray, pred: np.ndarray, scale: int = 3
) -> Image.Image:
    """One row per mosaic: image | truth | prediction (class colours), and a legend of the colours."""
    font = _font()
    colours = palette(len(classes))
    side = images.shape[1] * scale
    header = _text_size(font, "prediction")[1] + 2 * GAP
    swatch = _text_size(font, "Ag")[1] + 2
    legend_w = max(swatch + GAP + _text_size(font, name)[0] for name in classes) + 2 * GAP
    width = max(3 * (side + GAP) + GAP, legend_w)
    rows_h = header + len(images) * (side + GAP)
    canvas = Image.new("RGB", (width, rows_h + len(classes) * (swatch + GAP) + GAP), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(("image", "truth", "prediction")):
        draw.text((GAP + col * (side + GAP), GAP), title, fill=INK, font=font)
    for row in range(len(images)):
        y = header + row * (side + GAP)
        panels = (images[row], colorize(truth[row], len(classes)), colorize(pred[row], len(classes)))
        for col, panel in enumerate(panels):
            canvas.paste(_scaled(panel, scale), (GAP + col * (side + GAP), y))
    for i, name in enumerate(classes):
        y = rows_h + GAP + i * (swatch + GAP)
        draw.rectangle((GAP, y, GAP + swatch, y + swatch), fill=tuple(int(c) for c in colours[i]))
        draw.text((2 * GAP + swatch, y), name, fill=INK, font=font)
    return canvas


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _per_class_csv(path: Path, column: str, values: dict[str, float | None]) -> Path:
    """``class,<column>`` rows in the dict's (class) order; a class whose value is None is left out."""
    rows = [(name, f"{value:.6g}") for name, value in values.items() if value is not None]
    atomic_write_text(path, _csv_text(("class", column), rows))
    return path


def write_per_class_plots(plots_dir: Path, per_class: dict[str, dict[str, float | None]]) -> list[Path]:
    """``<name>.csv`` with column ``<name>`` for each ``name -> (class -> value)`` in ``per_class``; the files."""
    return [_per_class_csv(Path(plots_dir) / f"{name}.csv", name, values) for name, values in per_class.items()]


def write_confusion_csv(path: Path, classes: Sequence[str], actual: np.ndarray, predicted: np.ndarray) -> Path:
    """``actual,predicted`` class names, one row per sampled pixel (see the module docstring)."""
    rows = [(classes[a], classes[p]) for a, p in zip(actual.tolist(), predicted.tolist(), strict=True)]
    atomic_write_text(path, _csv_text(("actual", "predicted"), rows))
    return path


def write_gan_plots(plots_dir: Path, data: dict[str, Any]) -> list[Path]:
    """``gan_samples.png`` from :func:`pipeline.evaluation.gan_plot_data`'s output; returns the files written."""
    image = sample_grid_image(data["classes"], data["real"], data["generated"])
    return [_write_png(Path(plots_dir) / GAN_SAMPLES, image)]


def write_segmenter_plots(plots_dir: Path, data: dict[str, Any]) -> list[Path]:
    """Confusion PNG + CSV and example PNG from ``evaluate_segmenter``'s plot data; returns the files."""
    plots_dir, classes = Path(plots_dir), data["classes"]
    return [
        _write_png(plots_dir / CONFUSION_PNG, confusion_image(classes, data["confusion"])),
        _write_png(
            plots_dir / SEGMENTATION_EXAMPLES,
            segmentation_examples_image(classes, data["images"], data["truth"], data["pred"]),
        ),
        write_confusion_csv(plots_dir / CONFUSION_CSV, classes, data["actual"], data["predicted"]),
    ]
