"""Texture sources: builtin (procedural + scikit-image photos, offline) or a folder of images, split by source.

A *source instance* is one square RGB uint8 texture of ``data.source_size`` pixels with a stable id such as
``brick/0007``. Splits are made per class by instance, so no instance (and no pixel of it) feeds two splits.
Every random choice comes from a generator seeded by ``(seed, class name, instance, purpose)``, so adding or
removing a class leaves the other classes' textures and splits unchanged.
"""

from __future__ import annotations

import colorsys
import functools
import math
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.config import DataConfig
from pipeline.errors import UserError, one_line

SPLITS = ("train", "val", "test")
PROCEDURAL = ("stripes", "checker", "dots", "noise", "cells", "wood", "weave")
PHOTOS = ("brick", "grass", "gravel")
BUILTIN_CLASSES = PROCEDURAL + PHOTOS


@dataclass(frozen=True)
class SourceImage:
    """One source texture: ``id`` like ``brick/0007``, ``label`` = class index, ``image`` (S, S, 3) uint8."""

    id: str
    label: int
    image: np.ndarray = field(repr=False)
    row: int = 0  # position in load order (prepare's row of it in the on-disk source store)


@dataclass(frozen=True)
class SourceSpec:
    """One source instance before loading: ``id``, class ``label`` and ``name``, builtin instance ``index``
    (folder: position in its class folder) and, for the folder source, the file ``path``."""

    id: str
    label: int
    name: str
    index: int
    path: str = ""


@dataclass(frozen=True)
class SourceSet:
    """Class names (index order), source instances per split, and files the folder source skipped."""

    classes: tuple[str, ...]
    splits: dict[str, list[SourceImage]]
    skipped: list[dict[str, str]]


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys`` (strings hashed with a stable CRC32)."""
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(words)


# ---------------------------------------------------------------- colours and noise helpers


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` colours (n, 3) in [0, 1], dark to light, with neighbouring hues so they look like one material."""
    hue = rng.uniform()
    values = np.sort(rng.uniform(0.1, 0.95, n))
    values[-1] = max(values[-1], values[0] + 0.35)  # keep the structure visible
    return np.stack([_hsv(hue + rng.uniform(-0.12, 0.12), rng.uniform(0.25, 0.9), min(v, 1.0)) for v in values])


def _colourise(t: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map a field ``t`` in [0, 1] through a piecewise-linear palette -> (H, W, 3) float."""
    stops = np.linspace(0.0, 1.0, len(palette))
    return np.stack([np.interp(t, stops, palette[:, c]) for c in range(3)], axis=-1)


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean and unit std."""
    g = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (g - g.mean()) / (g.std() + 1e-8)


def _fractal_noise(rng: np.random.Generator, size: int, base_sigma: float, octaves: int) -> np.ndarray:
    """Sum of smooth noise octaves (halving scale and amplitude), normalised to unit std."""
    total = sum(0.5**k * smooth_noise(rng, size, max(base_sigma / 2**k, 0.5)) for k in range(octaves))
    return total / total.std()


def _normalise(t: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(t, [1, 99])
    return np.clip((t - lo) / (hi - lo + 1e-8), 0.0, 1.0)


def _rotated_coords(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by a random angle (u along, v across)."""
    theta = rng.uniform(0.0, math.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta)


def _finish(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Add a little sensor grain and convert to uint8."""
    grain = rng.normal(0.0, rng.uniform(0.0, 0.03), rgb.shape[:2])[..., None]
    return np.clip(np.rint((rgb + grain) * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- procedural textures


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    u, _ = _rotated_coords(rng, size)
    period = rng.uniform(5.0, 20.0)
    u = u + rng.uniform(0.0, 0.3) * period * smooth_noise(rng, size, size / 8)
    sharpness = rng.uniform(1.0, 6.0)  # 1: soft sinusoid, 6: hard edges
    s = np.sin(2 * math.pi * (u / period + rng.uniform()))
    t = np.clip(0.5 + sharpness * (s + rng.uniform(-0.3, 0.3)) / 2, 0.0, 1.0)
    return _colourise(t, _palette(rng, 2))


def _checker(rng: np.random.Generator, size: int) -> np.ndarray:
    u, v = _rotated_coords(rng, size)
    cell = rng.uniform(6.0, 20.0)
    s = np.sin(math.pi * (u / cell + rng.uniform())) * np.sin(math.pi * (v / cell + rng.uniform()))
    t = np.clip(0.5 + rng.uniform(3.0, 10.0) * s, 0.0, 1.0)
    t = t + 0.05 * smooth_noise(rng, size, 2.0)
    return _colourise(np.clip(t, 0, 1), _palette(rng, 2))


def _dots(rng: np.random.Generator, size: int) -> np.ndarray:
    u, v = _rotated_coords(rng, size)
    spacing = rng.uniform(8.0, 18.0)
    radius = rng.uniform(0.2, 0.38) * spacing
    hexagonal = rng.uniform() < 0.5
    row = np.floor(v / spacing)
    u = u + (0.5 * spacing * (row % 2) if hexagonal else 0.0)
    col = np.floor(u / spacing)
    # per-dot jitter of position and radius, looked up by lattice cell
    n = int(2 * size / spacing) + 4
    jitter = rng.uniform(-1, 1, (n, n, 3)) * np.array([0.5 - radius / spacing, 0.5 - radius / spacing, 0.2])
    ci, cj = (row.astype(int) % n), (col.astype(int) % n)
    cu = (col + 0.5 + jitter[ci, cj, 0]) * spacing
    cv = (row + 0.5 + jitter[ci, cj, 1]) * spacing
    dist = np.hypot(u - cu, v - cv)
    t = np.clip(radius * (1 + jitter[ci, cj, 2]) - dist + 0.5, 0.0, 1.0)
    return _colourise(t, _palette(rng, 2)[:: 1 if rng.uniform() < 0.5 else -1])


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    t = _fractal_noise(rng, size, rng.uniform(2.0, 7.0), int(rng.integers(2, 5)))
    return _colourise(_normalise(t), _palette(rng, int(rng.integers(2, 4))))


def _cells(rng: np.random.Generator, size: int) -> np.ndarray:
    cell = rng.uniform(12.0, 32.0)
    n = max(4, int((size / cell) ** 2))
    points = rng.uniform(0, size, (n, 2))
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    d = np.hypot(y[..., None] - points[:, 0], x[..., None] - points[:, 1])
    order = np.argsort(d, axis=-1)[..., :2]
    d1 = np.take_along_axis(d, order[..., :1], -1)[..., 0]
    d2 = np.take_along_axis(d, order[..., 1:], -1)[..., 0]
    palette = _palette(rng, 3)
    tone = rng.uniform(0.35, 1.0, n)[order[..., 0]] - 0.15 * d1 / cell  # slight shading towards the border
    border = np.clip((d2 - d1 - rng.uniform(1.0, 3.0)) / 1.5, 0.0, 1.0)  # 0 on the border line
    return _colourise(np.clip(tone, 0, 1) * border, palette)


def _wood(rng: np.random.Generator, size: int) -> np.ndarray:
    u, v = _rotated_coords(rng, size)
    centre = rng.uniform(-size, 2 * size, 2)
    stretch = rng.uniform(3.0, 10.0)  # rings elongated along the grain
    r = np.hypot((u - centre[0]) / stretch, v - centre[1])
    r = r + rng.uniform(2.0, 6.0) * _fractal_noise(rng, size, size / 6, 3)
    spacing = rng.uniform(4.0, 10.0)
    rings = ((r / spacing) % 1.0) ** rng.uniform(1.5, 4.0)
    # fine grain lines running along u: a 1-D noise profile across v
    steps = np.arange(-2 * size, 2 * size + 1)
    profile = ndimage.gaussian_filter1d(rng.standard_normal(steps.size), 0.8)
    grain = np.interp(v, steps, profile)
    t = np.clip(0.8 * rings + 0.15 * _normalise(grain), 0.0, 1.0)
    hue = rng.uniform(0.03, 0.11)
    dark = _hsv(hue, rng.uniform(0.5, 0.8), rng.uniform(0.2, 0.45))
    light = _hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.35, 0.7), rng.uniform(0.6, 0.95))
    return _colourise(1.0 - t, np.stack([dark, light]))


def _weave(rng: np.random.Generator, size: int) -> np.ndarray:
    u, v = _rotated_coords(rng, size)
    pitch = rng.uniform(6.0, 14.0)
    gap = rng.uniform(0.05, 0.2)
    i, j = np.floor(u / pitch), np.floor(v / pitch)
    fu, fv = u / pitch - i, v / pitch - j
    twill = rng.uniform() < 0.4
    warp_on_top = ((i - j) % 4 < 2) if twill else ((i + j) % 2 == 0)

    def profile(f: np.ndarray) -> np.ndarray:  # 1 in the thread middle, 0 at its edges and in the gap
        return np.sin(math.pi * np.clip((f - gap) / (1 - 2 * gap), 0.0, 1.0))

    warp, weft = profile(fu), profile(fv)
    warp_colour, weft_colour = _palette(rng, 2)[:: 1 if rng.uniform() < 0.5 else -1]
    gap_colour = np.minimum(warp_colour, weft_colour) * 0.3
    warp_shade = (0.5 + 0.5 * warp) * (0.75 + 0.25 * np.sin(math.pi * fv))
    weft_shade = (0.5 + 0.5 * weft) * (0.75 + 0.25 * np.sin(math.pi * fu))
    warp_rgb, weft_rgb = warp_shade[..., None] * warp_colour, weft_shade[..., None] * weft_colour
    top = np.where(warp_on_top[..., None], warp_rgb, weft_rgb)
    top_present = np.where(warp_on_top, warp > 0, weft > 0)
    under = np.where(warp_on_top[..., None], weft_rgb, warp_rgb)
    under_present = np.where(warp_on_top, weft > 0, warp > 0)
    return np.where(top_present[..., None], top, np.where(under_present[..., None], 0.7 * under, gap_colour))


GENERATORS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "stripes": _stripes,
    "checker": _checker,
    "dots": _dots,
    "noise": _noise,
    "cells": _cells,
    "wood": _wood,
    "weave": _weave,
}


def procedural_texture(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One procedural texture (size, size, 3) uint8 of class ``name``."""
    return _finish(rng, GENERATORS[name](rng, size))


# ---------------------------------------------------------------- scikit-image photos


def photo_tile(gray: np.ndarray, instance: int, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Tile ``instance`` of a ceil(sqrt(count))^2 grid over ``gray`` (disjoint tiles), resized and tinted."""
    grid = math.ceil(math.sqrt(count))
    side = gray.shape[0] // grid
    r, c = divmod(instance, grid)
    tile = Image.fromarray(gray[r * side : (r + 1) * side, c * side : (c + 1) * side])
    t = np.asarray(tile.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    return _finish(rng, _colourise(_normalise(t), _palette(rng, 2)))  # contrast-stretched, then tinted


# ---------------------------------------------------------------- loading and splitting


def _select(requested: tuple[str, ...], available: tuple[str, ...], where: str) -> tuple[str, ...]:
    if not requested:
        return available
    for name in requested:
        if name not in available:
            raise UserError(f"{where}: unknown class {name!r} (valid: {', '.join(available)})")
    if len(set(requested)) != len(requested):
        raise UserError(f"data.classes: duplicate class names in {list(requested)}")
    return requested


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) instance counts: each split gets at least one of ``n >= 3`` instances."""
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    while n - n_val - n_test < 1:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def _split(instances: list[SourceImage], name: str, data: DataConfig, seed: int) -> dict[str, list[SourceImage]]:
    n_train, n_val, _ = split_counts(len(instances), data.val_fraction, data.test_fraction)
    order = rng_for(seed, name, "split").permutation(len(instances))
    shuffled = [instances[i] for i in order]
    parts = {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }
    return {split: sorted(items, key=lambda s: s.id) for split, items in parts.items()}


def _read_image(path: Path, size: int) -> np.ndarray:
    """RGB, short side resized to ``size``, centre-cropped to ``size`` x ``size``."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8).copy()


def folder_root(folder: str) -> Path:
    """The directory holding one sub-folder per class (``<folder>/images`` for the DTD layout)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"data.folder: {root}: no such directory")
    return root / "images" if (root / "images").is_dir() else root


def _folder_classes(root: Path) -> tuple[str, ...]:
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not names:
        raise UserError(f"data.folder: {root}: no class sub-folders (expected <folder>/<class>/*.jpg)")
    return names


def source_specs(data: DataConfig) -> tuple[tuple[str, ...], list[SourceSpec]]:
    """Class names (index order) and every source instance to load, in load order; nothing is read yet."""
    if data.source == "builtin":
        classes = _select(data.classes, BUILTIN_CLASSES, "data.classes")
        specs = [
            SourceSpec(f"{name}/{k:04d}", label, name, k)
            for label, name in enumerate(classes)
            for k in range(data.instances_per_class)
        ]
        return classes, specs
    root = folder_root(data.folder)
    classes = _select(data.classes, _folder_classes(root), f"data.classes (folder {root})")
    specs = []
    for label, name in enumerate(classes):
        directory = root / name
        files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"data.folder: {directory}: empty class folder")
        specs += [SourceSpec(f"{name}/{path.name}", label, name, k, str(path)) for k, path in enumerate(files)]
    return classes, specs


@functools.lru_cache(maxsize=len(PHOTOS))
def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def load_source(spec: SourceSpec, data: DataConfig, seed: int) -> np.ndarray | str:
    """The instance's (S, S, 3) uint8 image; for an unreadable folder file, why it was skipped."""
    size = data.source_size
    if not spec.path:
        rng = rng_for(seed, spec.name, spec.index, "source")
        if spec.name in PHOTOS:
            return photo_tile(_photo(spec.name), spec.index, data.instances_per_class, size, rng)
        return procedural_texture(spec.name, rng, size)
    try:
        return _read_image(Path(spec.path), size)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {one_line(exc)}"


def readable_sources(
    specs: list[SourceSpec], images: Iterable[np.ndarray | str], skipped: list[dict[str, str]]
) -> Iterator[tuple[int, SourceSpec, np.ndarray]]:
    """(row, spec, image) of each loaded instance; a skipped file is warned about and appended to ``skipped``."""
    for row, (spec, image) in enumerate(zip(specs, images, strict=True)):
        if isinstance(image, str):
            print(f"warning: {spec.path}: skipped ({image})", file=sys.stderr)
            skipped.append({"file": spec.path, "reason": image})
            continue
        yield row, spec, image


def split_sources(
    sources: list[SourceImage], classes: tuple[str, ...], data: DataConfig, seed: int
) -> dict[str, list[SourceImage]]:
    """The instances of each class split into train/val/test by instance (each split sorted by id)."""
    splits: dict[str, list[SourceImage]] = {s: [] for s in SPLITS}
    for label, name in enumerate(classes):
        instances = [s for s in sources if s.label == label]
        if len(instances) < len(SPLITS):  # a folder with unreadable files (data.instances_per_class is >= 3)
            raise UserError(
                f"data.folder: {folder_root(data.folder) / name}: {len(instances)} readable image(s); "
                f"need at least {len(SPLITS)} (one per split)"
            )
        for split, items in _split(instances, name, data, seed).items():
            splits[split].extend(items)
    return splits


def load_sources(data: DataConfig, seed: int, imap: Callable[..., Iterable[Any]] = map) -> SourceSet:
    """Every source instance of the selected classes in memory, split into train/val/test by instance.

    ``imap(function, specs)`` loads them (a process pool's ``imap`` loads them in parallel, in order).
    """
    classes, specs = source_specs(data)
    skipped: list[dict[str, str]] = []
    images = imap(functools.partial(load_source, data=data, seed=seed), specs)
    sources = [
        SourceImage(spec.id, spec.label, image, row) for row, spec, image in readable_sources(specs, images, skipped)
    ]
    return SourceSet(classes, split_sources(sources, classes, data, seed), skipped)
