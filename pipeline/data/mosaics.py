"""Samples cut from source textures: augmented patches, and mosaics with an exact per-pixel class mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.data.sources import SourceImage, rng_for

LAYOUTS = ("voronoi", "blobs")
MIN_REGION_FRACTION = 0.05  # every texture of a mosaic covers at least this share of its pixels


@dataclass(frozen=True)
class Mosaic:
    """An RGB mosaic (M, M, 3) uint8, its class-index mask (M, M) uint8, the source ids and the layout kind."""

    image: np.ndarray
    mask: np.ndarray
    sources: list[str]
    layout: str


def random_crop(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    top, left = rng.integers(0, image.shape[0] - size + 1), rng.integers(0, image.shape[1] - size + 1)
    return image[top : top + size, left : left + size]


def augment(rng: np.random.Generator, image: np.ndarray, aug: AugmentConfig) -> np.ndarray:
    """Random flips, 90-degree rotation and brightness/contrast/saturation jitter of strength ``color_jitter``.

    The same random numbers are drawn whatever the switches, so turning one off changes nothing else.
    """
    hflip, vflip = rng.uniform(size=2) < 0.5
    turns = int(rng.integers(0, 4))
    brightness, contrast, saturation = 1.0 + aug.color_jitter * rng.uniform(-1.0, 1.0, 3)
    if aug.flip:
        image = image[:, ::-1] if hflip else image
        image = image[::-1] if vflip else image
    if aug.rot90:
        image = np.rot90(image, turns)
    if aug.color_jitter > 0:
        x = image.astype(np.float64) * brightness
        x = (x - x.mean()) * contrast + x.mean()
        gray = x.mean(axis=-1, keepdims=True)
        x = gray + (x - gray) * saturation
        image = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def make_patches(source: SourceImage, count: int, size: int, aug: AugmentConfig, seed: int) -> list[np.ndarray]:
    """``count`` augmented random crops of ``source``, deterministic in (seed, source id)."""
    rng = rng_for(seed, source.id, "patches")
    return [augment(rng, random_crop(rng, source.image, size), aug) for _ in range(count)]


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field: a ``cells`` x ``cells`` grid of normal values upsampled bicubically."""
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)


def region_layout(rng: np.random.Generator, size: int, regions: int) -> tuple[np.ndarray, str]:
    """A (size, size) map of region indices 0..regions-1 (Voronoi cells with wavy borders, or smooth blobs).

    Redrawn until every region covers at least ``MIN_REGION_FRACTION`` of the pixels.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    while True:
        kind = LAYOUTS[int(rng.integers(0, len(LAYOUTS)))]
        if kind == "voronoi":
            amp = rng.uniform(0.0, size / 10)  # wavy borders
            wy = y + amp * _smooth_field(rng, size, 4)
            wx = x + amp * _smooth_field(rng, size, 4)
            points = rng.uniform(0, size, (regions, 2))
            dist = (wy[..., None] - points[:, 0]) ** 2 + (wx[..., None] - points[:, 1]) ** 2
            layout = np.argmin(dist, axis=-1)
        else:
            cells = int(rng.integers(3, 6))
            fields = [_smooth_field(rng, size, cells) for _ in range(regions)]
            layout = np.argmax(np.stack(fields, axis=-1), axis=-1)
        counts = np.bincount(layout.ravel(), minlength=regions)
        if counts.min() >= MIN_REGION_FRACTION * size * size:
            return layout, kind


def compose(textures: Sequence[np.ndarray], labels: Sequence[int], layout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``textures[r]`` where ``layout == r``; the mask holds ``labels[r]`` at exactly those pixels."""
    image = np.empty((*layout.shape, 3), dtype=np.uint8)
    mask = np.empty(layout.shape, dtype=np.uint8)
    for region, (texture, label) in enumerate(zip(textures, labels, strict=True)):
        where = layout == region
        image[where] = texture[where]
        mask[where] = label
    return image, mask


def make_mosaic(
    rng: np.random.Generator,
    by_class: dict[int, list[SourceImage]],
    size: int,
    max_regions: int,
    aug: AugmentConfig,
) -> Mosaic:
    """A mosaic of 2..max_regions textures of distinct classes drawn from ``by_class`` (one split's sources)."""
    labels = sorted(by_class)
    count = int(rng.integers(2, min(max_regions, len(labels)) + 1))
    chosen = [labels[i] for i in rng.choice(len(labels), count, replace=False)]
    sources = [by_class[c][int(rng.integers(0, len(by_class[c])))] for c in chosen]
    textures = [augment(rng, random_crop(rng, s.image, size), aug) for s in sources]
    layout, kind = region_layout(rng, size, count)
    image, mask = compose(textures, chosen, layout)
    return Mosaic(image, mask, [s.id for s in sources], kind)
