"""Batch augmentations: geometric ones that keep every segmentation mask aligned, and per-image colour.

Each sample gets its own flips, quarter turn and scale (zoom in: random crop back to size; zoom out:
reflect-pad back to size), all drawn from one ``torch.Generator`` so a batch is reproducible from a
seed. The image and the one-hot mask go through the *same* resampling as one tensor and the mask is
the argmax of its resampled planes: at every output pixel the label is the class whose pixels make up
most of that pixel's colour, so no half-pixel offset between image and mask can creep in (a separate
nearest-neighbour resize of the mask would follow a different sampling grid than the bilinear image).
Colour changes (:func:`color_augment`) act on images alone and keep every edge; the segmenter and the
FID feature extractor share them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_SCALE = 0.5  # reflect padding needs the zoomed-out image to be at least half the output size


def augment_batch(
    images: Tensor,
    masks: Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    flip: bool = True,
    rot90: bool = True,
    scale_range: tuple[float, float] | None = (0.75, 1.25),
) -> tuple[Tensor, Tensor]:
    """Augment ``images (B, C, H, W)`` float and ``masks (B, H, W)`` int64 (values < ``num_classes``) alike.

    ``generator`` is a CPU generator; the tensors may live on any device. Quarter turns need square
    images (otherwise only half turns are used). Returns new tensors; the inputs are not modified.
    """
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(
            f"expected images (B, C, H, W) and masks (B, H, W), got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    if scale_range is not None and not MIN_SCALE <= scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must satisfy {MIN_SCALE} <= low <= high, got {scale_range}")
    b, c, h, w = images.shape
    draws = torch.rand(b, 6, generator=generator, dtype=torch.float64).tolist()
    rescale = scale_range is not None and scale_range[1] > scale_range[0]
    if rescale:  # resampled: the mask travels as one-hot planes and comes back as their argmax
        planes = F.one_hot(masks, num_classes).permute(0, 3, 1, 2).to(images.dtype)
    else:  # flips and turns only move pixels: the class index travels as one exact channel
        planes = masks[:, None].to(images.dtype)
    both = torch.cat([images, planes], dim=1)
    out = []
    for x, (u_h, u_v, u_rot, u_scale, u_y, u_x) in zip(both, draws, strict=True):
        if flip and u_h < 0.5:
            x = x.flip(-1)
        if flip and u_v < 0.5:
            x = x.flip(-2)
        if rot90:
            turns = int(u_rot * 4) if h == w else 2 * int(u_rot * 2)
            x = torch.rot90(x, turns, dims=(-2, -1))
        if rescale:
            scale = scale_range[0] + u_scale * (scale_range[1] - scale_range[0])
            x = _rescale(x, scale, h, w, u_y, u_x)
        out.append(x)
    x = torch.stack(out)
    if not rescale:
        return x[:, :c].contiguous(), x[:, c].long()
    # ``max(1).indices`` is ``argmax(1)`` (first maximum on ties) at a quarter of its CPU time on this layout.
    return x[:, :c].contiguous(), x[:, c:].max(1).indices


def _rescale(x: Tensor, scale: float, h: int, w: int, u_y: float, u_x: float) -> Tensor:
    """Resize by ``scale`` (bilinear), then crop (zoom in) or reflect-pad (zoom out) back to ``h x w``."""
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return x
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    if nh >= h and nw >= w:
        top, left = math.floor(u_y * (nh - h + 1)), math.floor(u_x * (nw - w + 1))
        return x[:, top : top + h, left : left + w]
    top, left = math.floor(u_y * (h - nh + 1)), math.floor(u_x * (w - nw + 1))
    pad = (left, w - nw - left, top, h - nh - top)
    # Reflection needs each pad narrower than the image: true for scale >= 0.5 up to rounding on tiny sizes.
    mode = "reflect" if max(pad[:2]) < nw and max(pad[2:]) < nh else "replicate"
    return F.pad(x[None], pad, mode=mode)[0]


def color_augment(images: Tensor, generator: torch.Generator, strength: float = 1.0) -> Tensor:
    """Per-image colour changes that keep every edge: channel order, saturation, contrast and brightness.

    ``images (B, 3, H, W)`` in [0, 1]. At ``strength`` 1 the saturation factor is drawn from [0, 1.5],
    contrast from [0.6, 1.4] and the brightness shift from [-0.1, 0.1]; ``strength`` scales these ranges,
    and any ``strength`` > 0 shuffles the channel order (0 = identity). Builtin palettes are drawn per
    source texture, so with ~20 train sources per class a model left with geometric augmentation alone
    tells classes apart by their train sources' colours (segmenter, measured: val mIoU 0.25 without vs
    0.37 with this after 300 steps, 0.61 after 800).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if strength <= 0:
        return images
    b = images.shape[0]
    order = torch.rand(b, 3, generator=generator).argsort(1).to(images.device)

    def uniform(lo: float, hi: float) -> Tensor:
        u = torch.rand(b, generator=generator).to(device=images.device, dtype=images.dtype)
        return (lo + (hi - lo) * u)[:, None, None, None]

    x = images.gather(1, order[:, :, None, None].expand_as(images))
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * uniform(1.0 - strength, 1.0 + 0.5 * strength)
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = uniform(1.0 - 0.4 * strength, 1.0 + 0.4 * strength)
    return ((x - mean) * contrast + mean + uniform(-0.1 * strength, 0.1 * strength)).clamp(0.0, 1.0)
