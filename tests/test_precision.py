"""Precision choice per device (CUDA capability faked), fp16 with gradient scaling, torch.compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import config
from pipeline.distributed import DistEnv, native_bf16, plain_module, resolve_precision
from pipeline.training.gan import build_models
from pipeline.training.gan_loss import GanStep
from pipeline.training.loop import backward_and_step, wrap_ddp
from pipeline.training.segmenter import SegmenterStep, build_model
from tests.conftest import write_params

CUDA = torch.device("cuda", 0)
FP16_CPU = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", torch.float16)


@pytest.mark.parametrize(
    ("capability", "auto"),
    [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16), ((7, 0), torch.float16)],
    ids=["hopper", "ampere", "turing", "volta"],
)
def test_auto_precision_follows_the_gpu_capability(
    capability: tuple[int, int], auto: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16(CUDA) == (capability[0] >= 8)
    assert resolve_precision("auto", CUDA) == auto
    assert resolve_precision("fp16", CUDA) == torch.float16
    assert resolve_precision("bf16", CUDA) == torch.bfloat16
    assert resolve_precision("fp32", CUDA) is None


def test_scaler_only_for_fp16() -> None:
    for dtype, enabled in ((torch.float16, True), (torch.bfloat16, False), (None, False)):
        env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", dtype)
        assert env.grad_scaler().is_enabled() == enabled


def test_a_skipped_fp16_step_counts_as_skipped_and_leaves_the_weights() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = FP16_CPU.grad_scaler()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.tensor([[float("inf"), 1.0]])).sum()
    norm, skipped = backward_and_step(loss, optimizer, scaler, model.parameters())
    assert skipped.item() == 1.0 and norm.item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() < 65536.0  # the scale backs off after an overflow
    model.zero_grad()
    norm, skipped = backward_and_step(model(torch.ones(1, 2)).sum(), optimizer, scaler, model.parameters())
    assert skipped.item() == 0.0 and norm.item() == pytest.approx(3.0**0.5, rel=1e-3)  # d/dW = (1, 1), d/db = 1


def test_fp16_gan_and_segmenter_steps_train_with_scaling(tmp_path: Path) -> None:
    cfg = config.load(write_params(tmp_path, {"gan.r1_gamma": 1.0, "gan.n_critic": 2}))
    models = build_models(cfg.gan, 4, 16, FP16_CPU, False, cfg.seed)
    step = GanStep(cfg.gan, models, FP16_CPU, 4, cfg.seed, False)
    gen = torch.Generator().manual_seed(0)
    reals = [(torch.rand(8, 3, 16, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(2)]
    g0 = [p.detach().clone() for p in models.g.parameters()]
    skipped = []
    for i in range(30):  # the first steps overflow at the initial scale of 2^16 and are skipped while it backs off
        values = step(i, reals)
        assert all(torch.isfinite(v) for v in values.values())
        skipped.append(values["fp16_skipped"].item())
    assert skipped[-1] == 0.0 and models.state()["scaler_g"]["scale"] < 65536.0
    assert any(not torch.equal(a, b) for a, b in zip(g0, models.g.parameters(), strict=True))

    model, optimizer = build_model(cfg.segmenter, 4, FP16_CPU, cfg.seed, channels_last=False)
    seg = SegmenterStep(cfg.segmenter, model, optimizer, FP16_CPU, 10, channels_last=False)
    images, masks = torch.rand(2, 3, 32, 32, generator=gen), torch.randint(0, 4, (2, 32, 32), generator=gen)
    terms = [seg(i, images, masks) for i in range(30)]
    assert all(torch.isfinite(t["train_loss"]) for t in terms) and terms[-1]["fp16_skipped"].item() == 0.0
    assert terms[-1]["train_loss"] < terms[0]["train_loss"]


@pytest.mark.slow
def test_compiled_model_computes_the_same_and_unwraps(tiny_cfg: config.Config) -> None:
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", None)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    compiled = wrap_ddp(model, env, compiled=True)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)  # float32: ~1e-5 relative
    assert plain_module(compiled) is model
