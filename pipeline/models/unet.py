"""U-Net texture segmenter (Ronneberger et al. 2015) with an optional atrous (DeepLab-style) bottleneck.

``depth`` counts resolution levels including the bottleneck: ``channels=16, depth=3`` has encoder
widths 16/32 and a 64-wide bottleneck at 1/4 resolution. Under DDP, BatchNorm becomes
``nn.SyncBatchNorm`` on CUDA; on CPU (gloo), where ``nn.SyncBatchNorm`` refuses to run, it becomes
:class:`SyncBatchNorm2d`, which all-reduces the batch statistics through autograd itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import checkpoint

# Images arrive in [0, 1]; the model normalises them itself so every caller (training, evaluation,
# serving) feeds the same thing. Texture pixels have no dataset-wide colour prior worth fitting.
INPUT_MEAN = 0.5
INPUT_STD = 0.25
# Atrous rates at the bottleneck (1/4 of a 64-px mosaic at depth 3 is 16 px: rates up to 6 still
# see mostly real pixels); DeepLabv3 uses 6/12/18 at its larger feature maps.
ATROUS_RATES = (2, 4, 6)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class AtrousBottleneck(nn.Module):
    """ASPP (DeepLabv3): a 1x1 branch, 3x3 branches at :data:`ATROUS_RATES`, image pooling; fused by a 1x1 conv."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()

        def branch(kernel: int, dilation: int) -> nn.Sequential:
            pad = dilation * (kernel // 2)
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel, padding=pad, dilation=dilation, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            )

        self.branches = nn.ModuleList([branch(1, 1), *(branch(3, r) for r in ATROUS_RATES)])
        # No BatchNorm on the pooled 1x1 branch: its statistics would come from one value per image.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            nn.Conv2d(c_out * (len(self.branches) + 1), c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class _Up(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int, mode: str) -> None:
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(c_in, c_skip, 2, stride=2)
            c_cat = 2 * c_skip
        else:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            c_cat = c_in + c_skip
        self.conv = _double_conv(c_cat, c_out)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """``forward(images (B, 3, H, W) in [0, 1]) -> logits (B, num_classes, H, W)``, any H and W."""

    def __init__(
        self,
        num_classes: int,
        channels: int = 16,
        depth: int = 3,
        upsample: Literal["bilinear", "transpose"] = "bilinear",
        dropout: float = 0.0,
        dilated_bottleneck: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2 or channels < 1 or depth < 1:
            raise ValueError(
                f"UNet needs num_classes >= 2, channels >= 1, depth >= 1; got {num_classes}, {channels}, {depth}"
            )
        if upsample not in ("bilinear", "transpose"):
            raise ValueError(f"upsample must be 'bilinear' or 'transpose', got {upsample!r}")
        self.kwargs = {
            "num_classes": num_classes,
            "channels": channels,
            "depth": depth,
            "upsample": upsample,
            "dropout": float(dropout),
            "dilated_bottleneck": bool(dilated_bottleneck),
        }
        widths = [channels * 2**i for i in range(depth)]
        self.multiple = 2 ** (depth - 1)
        self.down = nn.ModuleList()
        c_in = 3
        for w in widths[:-1]:
            self.down.append(_double_conv(c_in, w))
            c_in = w
        self.bottleneck = AtrousBottleneck(c_in, widths[-1]) if dilated_bottleneck else _double_conv(c_in, widths[-1])
        # As in the paper: dropout at the end of the contracting path.
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList(_Up(widths[i + 1], widths[i], widths[i], upsample) for i in reversed(range(depth - 1)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @property
    def num_classes(self) -> int:
        return self.kwargs["num_classes"]

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        x = (images - INPUT_MEAN) / INPUT_STD
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        if pad_h or pad_w:  # any size in, same size out: pad to the pooling multiple, crop the logits
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.dropout(self.bottleneck(x))
        for up, skip in zip(self.up, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(x)[..., :h, :w]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch, on any device and backend.

    ``nn.SyncBatchNorm`` raises on CPU tensors; this one gathers each rank's per-channel mean, variance
    and count with one differentiable all-reduce and combines them exactly (Chan et al.), so the
    forward and backward match a single process holding the global batch.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        world, rank = dist.get_world_size(), dist.get_rank()
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
        count = xf.new_full((1,), xf.numel() // xf.shape[1])
        row = torch.cat([mean, var, count])
        table = _AllReduceSum.apply(torch.stack([row if r == rank else torch.zeros_like(row) for r in range(world)]))
        c = x.shape[1]
        means, variances, counts = table[:, :c], table[:, c : 2 * c], table[:, 2 * c :]
        total = counts.sum()
        g_mean = (counts * means).sum(0) / total
        g_var = (counts * (variances + (means - g_mean) ** 2)).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = g_var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(g_mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        scale = torch.rsqrt(g_var + self.eps)
        if self.affine:
            shift = self.bias - g_mean * scale * self.weight
            scale = scale * self.weight
        else:
            shift = -g_mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum that every rank sees is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d synchronised across ranks: ``nn.SyncBatchNorm`` on CUDA, :class:`SyncBatchNorm2d` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        sync = SyncBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        sync.load_state_dict(module.state_dict())
        return sync.to(device)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def plain_module(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def save_segmenter(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``{"kwargs", "state_dict", "meta"}`` atomically; loadable with ``weights_only=True`` on any device."""
    net = plain_module(model)
    if not isinstance(net, UNet):
        raise TypeError(f"expected a UNet (optionally DDP-wrapped), got {type(net).__name__}")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    checkpoint.save({"kwargs": dict(net.kwargs), "state_dict": state, "meta": dict(meta)}, path)


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """The saved U-Net in eval mode on ``device``, and its meta (``classes``, ``run_id``, ``val_miou``, ...)."""
    payload = checkpoint.load(path, map_location="cpu")
    try:
        model = UNet(**payload["kwargs"])
        model.load_state_dict(payload["state_dict"])
        meta = dict(payload["meta"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise checkpoint.CheckpointError(f"{path}: not a segmenter model file ({type(exc).__name__}: {exc})") from None
    return model.to(device).eval(), meta
