"""Image helpers shared by the shards, the plots, the pyfunc models and the CLI: to-uint8, PNG bytes, class colours."""

from __future__ import annotations

import colorsys
import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PNG_LEVEL = 6  # zlib level of every PNG written; PIL adds no timestamps, so the same array gives the same bytes
# matplotlib's tab10: distinct on screen and in print; more classes continue around the hue circle.
TAB10 = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> uint8 (N, H, W, 3): clamped, scaled by 255, rounded to nearest."""
    import torch

    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().contiguous().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) grey or (H, W, 3) RGB array; stable bytes for the same array."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def decode_png(data: bytes, mode: str) -> np.ndarray:
    """A PNG in PIL ``mode`` as a read-only uint8 array ("RGB" -> (H, W, 3), "L" -> (H, W)); raises on bad data."""
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
        if im.mode != mode:
            raise ValueError(f"expected a {mode} PNG, got {im.mode}")
        return np.asarray(im)


def palette(num_classes: int) -> np.ndarray:
    """The class colours, uint8 (num_classes, 3): tab10, then golden-ratio steps around the hue circle."""
    extra = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.9) for i in range(max(0, num_classes - len(TAB10)))]
    colours = TAB10[:num_classes] + [tuple(round(255 * v) for v in rgb) for rgb in extra]
    return np.asarray(colours, dtype=np.uint8).reshape(num_classes, 3)


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Class indices (..., H, W) -> uint8 (..., H, W, 3) in the :func:`palette` colours."""
    return palette(num_classes)[np.asarray(mask)]
