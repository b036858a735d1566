"""The segmenter families by ``segmenter.arch`` name, built from params, and their one model file format.

A model file is :func:`pipeline.checkpoint.save_model`'s ``{"kwargs", "state_dict", "meta"}`` with the
family's name in ``kwargs["arch"]``; :func:`load_segmenter` rebuilds whichever family a file holds. Files
without the field (written before there were other families) are U-Nets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import checkpoint
from pipeline.config import SegmenterConfig, to_dict
from pipeline.distributed import plain_module
from pipeline.models.deeplab import DeepLabV3
from pipeline.models.fcn import FCN
from pipeline.models.renet import ReNet
from pipeline.models.segformer import SegFormer
from pipeline.models.segmenter_base import Segmenter
from pipeline.models.unet import UNet

SEGMENTERS: dict[str, type[Segmenter]] = {cls.arch: cls for cls in (UNet, FCN, DeepLabV3, SegFormer, ReNet)}
LEGACY_ARCH = "unet"  # the family of model files that do not name one


def build_segmenter(arch: str, num_classes: int, **params: Any) -> Segmenter:
    """The ``arch`` family's model with ``num_classes`` outputs and its constructor ``params``."""
    if arch not in SEGMENTERS:
        raise ValueError(f"unknown segmenter arch {arch!r}; expected one of {', '.join(SEGMENTERS)}")
    return SEGMENTERS[arch](num_classes, **params)


def segmenter_params(s: SegmenterConfig, arch: str | None = None) -> dict[str, Any]:
    """The constructor params of family ``arch`` (default ``s.arch``) from the ``segmenter`` section: the
    U-Net's top-level keys, another family's own sub-section; ``tta`` for all."""
    arch = arch or s.arch
    if arch == "unet":
        return {
            "channels": s.channels,
            "depth": s.depth,
            "upsample": s.upsample,
            "dropout": s.dropout,
            "dilated_bottleneck": s.dilated_bottleneck,
            "decoder": s.decoder,
            "tta": s.tta,
        }
    return to_dict(getattr(s, arch)) | {"tta": s.tta}


def segmenter_from_config(s: SegmenterConfig, num_classes: int, arch: str | None = None) -> Segmenter:
    """The family ``arch`` (default ``s.arch``) as the ``segmenter`` section configures it."""
    arch = arch or s.arch
    return build_segmenter(arch, num_classes, **segmenter_params(s, arch))


def _from_file_kwargs(arch: str = LEGACY_ARCH, **kwargs: Any) -> Segmenter:
    num_classes = kwargs.pop("num_classes")
    return build_segmenter(arch, num_classes, **kwargs)


def save_segmenter(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """The segmenter model file (see :func:`pipeline.checkpoint.save_model`); ``model`` may be DDP-wrapped."""
    net = plain_module(model)
    if not isinstance(net, Segmenter):
        raise TypeError(f"expected a segmenter (optionally DDP-wrapped), got {type(net).__name__}")
    checkpoint.save_model(path, net, {"arch": net.arch, **net.kwargs}, meta)


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[Segmenter, dict[str, Any]]:
    """The saved segmenter, whatever its family, in eval mode on ``device``, and its meta (``classes``, ...)."""
    model, meta = checkpoint.load_model(path, _from_file_kwargs, "segmenter model")  # type: ignore[arg-type]
    return model.to(device).eval(), meta
