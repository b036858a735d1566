"""Distributed set-up from the torchrun environment, and the few collectives the pipeline needs.

Works the same under ``torchrun --nproc_per_node=N`` (any N, any number of nodes) and as a
plain process (world size 1, no process group). NCCL + one GPU per local rank + bf16 autocast on
CUDA; gloo on CPU, with bf16 autocast where the CPU computes bf16 natively (AVX512-BF16 or AMX) and fp32
elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.config import TrainConfig
from pipeline.errors import LAUNCHER_PID, UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job and what it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    amp_dtype: torch.dtype | None  # None = full fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 or fp16 autocast where chosen, a no-op otherwise."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The loss scaler fp16 needs (its gradients underflow otherwise); a pass-through for bf16 and fp32."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


def _resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' was asked for but no CUDA device is available")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        torch.cuda.set_device(local_rank % count)
        return torch.device("cuda", local_rank % count)
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a GPU of compute capability >= 8.0 (Ampere on), or an x86
    CPU with AVX512-BF16 or AMX-BF16.

    On such a CPU bf16 autocast made the U-Net training step 1.6x faster (AMD EPYC, 2 cores); without
    them bf16 is emulated and slower than fp32. V100/T4-class GPUs (7.x) compute fp16, not bf16.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch releases
    caps = capabilities() if capabilities is not None else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None = fp32).

    ``auto``: bf16 where the device computes it natively, fp16 (with gradient scaling) on older GPUs, fp32
    on other CPUs.
    """
    if choice == "bf16" or (choice == "auto" and native_bf16(device)):
        return torch.bfloat16
    if choice == "fp16" or (choice == "auto" and device.type == "cuda"):
        return torch.float16
    return None


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """SIGKILL this process as soon as ``parent``, the process that started it, is gone (Linux only).

    The kernel sends the signal when the parent thread that forked us exits; a parent already gone before the
    call (we were re-parented) is caught by comparing ``getppid()``. SIGKILL, not SIGTERM: with its launcher
    gone the job is over (no restarts, a successor may be waiting for the stage lock), and a graceful stop
    would need every rank at a step boundary and a collective with peers that may be dead. The last complete
    checkpoint stays as it was: checkpoints are written atomically.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def _die_with_torchrun_agent() -> None:
    """Under torchrun, a rank dies with its agent (whose workers run in their own sessions, out of reach of a
    kill of the launcher's process group). ``pipeline.launch`` runs the agent and names its pid, which also
    covers an agent that died while this process was starting."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(int(os.environ.get(LAUNCHER_PID, os.getppid())))


def init_distributed(train: TrainConfig) -> DistEnv:
    """Join the process group torchrun describes (or run alone) and pick device and precision."""
    _die_with_torchrun_agent()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _resolve_device(train.device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Several ranks on one CPU box must not oversubscribe the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return DistEnv(rank, world_size, local_rank, device, backend, resolve_precision(train.precision, device))


def teardown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(train: TrainConfig) -> Iterator[DistEnv]:
    """``with distributed(cfg.train) as env:`` -- joins on entry, tears down on success and on error."""
    env = init_distributed(train)
    try:
        yield env
    finally:
        teardown()


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch from one seed, differently per rank; returns the rank seed."""
    rank_seed = (seed * 1_000_003 + rank) % (2**31)
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    return rank_seed


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks (in place, also returned); identity without a process group."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(values: dict[str, float | Tensor], device: torch.device) -> dict[str, float]:
    """Average a dict of scalars (floats or 0-d tensors) across ranks in one collective, in float64."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], device=device).detach().to(torch.float64) for k in keys])
    all_reduce_sum(t)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {k: v / world for k, v in zip(keys, t.tolist(), strict=True)}


def average_buffers(module: nn.Module) -> None:
    """Replace every floating-point buffer (BatchNorm running statistics) by its mean across ranks, in place.

    Per-rank BatchNorm leaves each rank with running statistics of its own batches; averaged (timm's
    ``distribute_bn``), every rank holds one model to validate and checkpoint. Flattened into one collective.
    """
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not dist.is_initialized() or not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
    all_reduce_sum(flat)
    flat /= dist.get_world_size()
    for b, mean in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        b.copy_(mean.view_as(b))


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's first dimension across ranks (sizes may differ per rank)."""
    if not dist.is_initialized():
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    max_n = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_n, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes, strict=True)])


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s python object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def collective_device() -> torch.device:
    """Where tensors must live for the current process group's collectives."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    """The model inside ``torch.compile`` and DDP wrappers (or the model itself)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def gather_in_order(local: Tensor, index: Tensor | None = None) -> Tensor:
    """Rows from every rank on the CPU, sorted by their global ``index`` (every rank gets all of them).

    ``index=None``: rank r holds samples r, r + W, r + 2W, ... (as ``eval_batches`` gives them), so the
    result is in the order one process would have seen them. Without a process group: ``local`` itself.
    """
    if not dist.is_initialized():
        return local.detach().cpu() if index is None else local.detach().cpu()[index.cpu().argsort()]
    device = collective_device()
    if index is None:
        index = torch.arange(local.shape[0], device=device) * dist.get_world_size() + dist.get_rank()
    rows = all_gather_cat(local.detach().to(device)).cpu()
    order = all_gather_cat(index.to(device)).cpu().argsort()
    return rows[order]
