"""Feature extractors for FID/KID: a small texture classifier trained offline, or (optionally) Inception-v3.

Inception features are made for ImageNet photos at 299 px; on 32 px procedural textures a classifier
trained on the textures themselves separates the classes and their variety much better, and runs on a
laptop CPU. Both map images in [0, 1] to one feature vector per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline import checkpoint
from pipeline.errors import UserError
from pipeline.tracking import file_sha256

MIN_SIZE = 16  # three 2x poolings leave at least 2x2 cells for the global average
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class TextureFeatureNet(nn.Module):
    """Texture classifier: 3 conv blocks (32/64/128) -> global average pool -> ``dim``-d layer -> class head."""

    def __init__(self, num_classes: int, dim: int = 128) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.trunk = nn.Sequential(_block(3, 32), _block(32, 64), _block(64, 128), nn.AdaptiveAvgPool2d(1))
        self.embed = nn.Linear(128, dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, num_classes))

    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1], H and W >= 16 -> (B, dim) penultimate activations.

        The ``dim``-d layer is taken before its ReLU: dense, closer to Gaussian and full rank,
        which is what the Fréchet distance assumes.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if min(images.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {tuple(images.shape[-2:])}")
        x = (images - 0.5) / 0.25
        return self.embed(self.trunk(x).flatten(1))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits."""
        return self.head(self.features(images))


class FeatureExtractor(nn.Module):
    """A frozen ``TextureFeatureNet`` whose forward is ``.features`` (e.g. for torchmetrics' ``feature=``);
    :meth:`classify` turns those features into the net's class logits."""

    def __init__(self, net: TextureFeatureNet) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # BatchNorm must keep its running statistics

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(images)

    @torch.no_grad()
    def classify(self, features: Tensor) -> Tensor:
        """Class logits (N, num_classes), float32 on the CPU, of features (N, dim) from :meth:`forward`."""
        head = self.net.head
        weight = head[-1].weight
        return head(features.to(weight.device, weight.dtype)).float().cpu()


def save_feature_extractor(path: str | Path, model: TextureFeatureNet, meta: dict[str, Any]) -> None:
    """The extractor model file (see :func:`pipeline.checkpoint.save_model`)."""
    checkpoint.save_model(path, model, {"num_classes": model.num_classes, "dim": model.dim}, meta)


def load_feature_extractor(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """``(module mapping [0, 1] images to (B, dim) features, meta)``; meta gains ``sha256`` of the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: feature extractor not found (run the train_fid_features stage first)")
    net, meta = checkpoint.load_model(path, TextureFeatureNet, "feature extractor")
    return FeatureExtractor(net).to(device), meta | {"sha256": file_sha256(path)}


class _InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception-v3 (2048-d pool features) fed with [0, 1] images."""

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        self.inception = inception

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.inception((images.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(images.shape[0], -1)


def inception_extractor(device: str | torch.device = "cpu") -> nn.Module:
    """Standard FID Inception-v3 features; needs the ``[inception]`` extra and its weights on disk."""
    hint = (
        f"pip install .[inception] and put torch-fidelity's {INCEPTION_WEIGHTS} in torch's hub cache "
        "($TORCH_HOME/hub/checkpoints); they cannot be downloaded here"
    )
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except (ImportError, ModuleNotFoundError):
        raise UserError(f"fid_features: inception needs torch-fidelity: {hint}") from None
    except Exception as exc:  # a failed download surfaces as URLError, HTTPError, RuntimeError...
        raise UserError(f"fid_features: inception weights unavailable ({type(exc).__name__}): {hint}") from None
    return _InceptionFeatures(inception).to(device)
