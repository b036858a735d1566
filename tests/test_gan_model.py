"""Generator families (DCGAN, ResNet, VAE) and their pieces: shapes per patch size, conditioning, attention, EMA,
DiffAugment, generation, the one model file for every family."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.models.gan import (
    EMA,
    GENERATORS,
    Discriminator,
    FourierHead,
    Generator,
    build_generator,
    diff_augment,
    generate_images,
    load_generator,
    sample_grid,
    save_generator,
)
from pipeline.models.gan_blocks import SelfAttention, attention_sides, layout
from pipeline.models.gan_resnet import ResNetDiscriminator, ResNetGenerator
from pipeline.models.vae import VaeDecoder, VaeEncoder, kl_divergence


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one torch thread (extra OpenMP threads only spin on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("size", "expected"), [(8, (4, 1)), (16, (4, 2)), (32, (4, 3)), (48, (6, 3)), (64, (4, 4))])
def test_layout_counts_doublings(size: int, expected: tuple[int, int]) -> None:
    assert layout(size) == expected


@pytest.mark.parametrize("size", [6, 17])
def test_layout_rejects_unusable_sizes(size: int) -> None:
    with pytest.raises(ValueError, match="image_size"):
        layout(size)


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize(
    ("conditioning", "sn", "fourier", "warp"),
    [("concat", False, 0, True), ("projection", True, 0, True), ("ac", True, 6, True), ("adc", True, 6, False)],
)
def test_generator_and_discriminator_shapes(size: int, conditioning: str, sn: bool, fourier: int, warp: bool) -> None:
    torch.manual_seed(0)
    g = Generator(num_classes=3, z_dim=8, channels=8, image_size=size, fourier=fourier, fourier_warp=warp)
    assert g.net[-1].out_channels == 3 + (fourier > 0 and warp)  # the phase map is a fourth output map
    d = Discriminator(3, 8, size, conditioning=conditioning, spectral_norm=sn, batch_norm=not sn)
    labels = torch.tensor([0, 1, 2, 1])
    images = g(torch.randn(4, 8), labels)
    assert images.shape == (4, 3, size, size)
    assert images.min() >= -1 and images.max() <= 1
    logits = d(images, labels)
    assert logits.shape == (4,)
    logits.sum().backward()
    assert all(p.grad is not None for p in g.parameters())


@pytest.mark.parametrize("conditioning", ["concat", "projection"])
def test_discriminator_depends_on_the_class(conditioning: str) -> None:
    torch.manual_seed(0)
    d = Discriminator(4, 8, 16, conditioning=conditioning).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert not torch.allclose(d(x, torch.tensor([0, 0])), d(x, torch.tensor([3, 3])))


@pytest.mark.parametrize(("conditioning", "heads"), [("ac", 1), ("adc", 2)])
def test_auxiliary_classifier_discriminator(conditioning: str, heads: int) -> None:
    """The real/fake logit ignores the label (no shortcut for the class head either); class logits on demand:
    K for ``ac``, 2K for ``adc`` (real classes, generated classes)."""
    torch.manual_seed(0)
    d = Discriminator(4, 8, 16, conditioning=conditioning).eval()  # type: ignore[arg-type]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    logits, classes = d(x, torch.tensor([0, 0]), with_classes=True)
    assert logits.shape == (2,) and classes.shape == (2, 4 * heads)
    other_logits, other_classes = d(x, torch.tensor([3, 3]), with_classes=True)
    assert torch.equal(logits, other_logits) and torch.equal(classes, other_classes)
    assert torch.equal(d(x, torch.tensor([1, 2])), logits)
    with pytest.raises(ValueError, match="class logits need a class head"):
        Discriminator(4, 8, 16)(x, torch.tensor([0, 0]), with_classes=True)
    with pytest.raises(ValueError, match="conditioning must be one of concat, projection, ac, adc"):
        Discriminator(4, 8, 16, conditioning="acgan")  # type: ignore[arg-type]


def test_discriminator_accepts_channels_last() -> None:
    torch.manual_seed(0)
    d = Discriminator(2, 8, 16).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 1])
    expected = d(x, y)
    d_cl = d.to(memory_format=torch.channels_last)
    assert torch.allclose(d_cl(x.contiguous(memory_format=torch.channels_last), y), expected, atol=1e-5)


def test_fourier_head_draws_the_sinusoids_its_mlp_asks_for_bent_by_the_warp() -> None:
    head = FourierHead(cond_dim=4, count=2, size=16)
    freq = torch.tensor([[0.1, 0.0], [0.05, -0.2]])  # cycles per pixel: vertical stripes, then a slanted wave
    phase, amplitude = torch.tensor([0.0, 0.5]), torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    with torch.no_grad():
        last = head.mlp[-1]
        last.weight.zero_()
        # Per sinusoid the MLP gives (frequency offset from the base, phase / pi, RGB amplitude).
        last.bias.copy_(torch.cat([freq - head.base, phase[:, None], amplitude], 1).flatten())
        warp = torch.zeros(3, 1, 16, 16)
        warp[1] = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
        out = head(torch.randn(3, 4), warp)
    x = torch.arange(16.0) - 7.5
    xx, yy = x[None, :].expand(16, 16), x[:, None].expand(16, 16)
    for i in range(3):
        waves = [
            torch.sin(2 * torch.pi * (f[0] * xx + f[1] * yy) + torch.pi * (p + warp[i, 0]))
            for f, p in zip(freq, phase, strict=True)
        ]
        expected = torch.einsum("kc,khw->chw", amplitude, torch.stack(waves))
        assert torch.allclose(out[i], expected, atol=1e-5)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out[0, 0, 0], out[0, 0, 5], atol=1e-5)  # unwarped, the first wave is straight stripes
    assert out[0, 0, 0].std() > 0.5
    assert not torch.allclose(out[1, 0, 0], out[1, 0, 5], atol=1e-2)  # the warp bends them
    cond = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(head(cond, None), head(cond, torch.zeros(3, 1, 16, 16)))  # no warp: straight waves
        head.mlp[-1].weight.normal_()  # frequencies that depend on the input, through the MLP
        exact = head(cond, warp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(head(cond, warp), exact)  # all fp32 under autocast, the MLP too


def test_fourier_base_frequencies_span_angles_and_periods() -> None:
    base = FourierHead(cond_dim=4, count=16, size=32).base
    period = 1 / base.norm(dim=1)
    angle = torch.atan2(base[:, 1], base[:, 0])
    assert period.max() > 16 and period.min() == pytest.approx(4 * (32 / 4) ** (1 / 32), rel=1e-4)
    assert angle.min() >= 0 and angle.max() < torch.pi and angle.sort().values.diff().max() < torch.pi / 4


def test_ema_averages_parameters_and_copies_buffers() -> None:
    g = Generator(2, 4, 8, 16)
    ema = EMA(g, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
        for name, b in g.named_buffers():
            if name.endswith("running_mean"):
                b.fill_(3.0)
    ema.update(g, step=1000)  # past the warm-up: the configured decay applies
    after = ema.state_dict()
    for name, _ in g.named_parameters():
        assert torch.allclose(after[name], before[name] + 0.1, atol=1e-6), name
    for name, b in g.named_buffers():
        assert torch.equal(after[name], b), name
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warm_up_follows_the_model_early() -> None:
    g = Generator(2, 4, 8, 16)
    ema = EMA(g, decay=0.999)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    ema.update(g, step=0)  # decay (1 + 0) / (10 + 0) = 0.1: mostly the new weights
    name, p = next(iter(g.named_parameters()))
    assert torch.allclose(ema.state_dict()[name], p - 0.1, atol=1e-6)


@pytest.mark.parametrize("policy", [("color",), ("translation",), ("cutout",), ("color", "translation", "cutout")])
def test_diff_augment_keeps_shape_changes_images_and_is_differentiable(policy: tuple[str, ...]) -> None:
    x = (torch.rand(6, 3, 16, 16) * 2 - 1).requires_grad_(True)
    out = diff_augment(x, policy, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diff_augment_is_seeded_and_split_invariant() -> None:
    policy = ("color", "translation", "cutout")
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    whole = diff_augment(x, policy, torch.Generator().manual_seed(5))
    again = diff_augment(x, policy, torch.Generator().manual_seed(5))
    assert torch.equal(whole, again)
    halves = [diff_augment(x[i * 4 : i * 4 + 4], policy, torch.Generator().manual_seed(5), i * 4, 8) for i in range(2)]
    assert torch.allclose(torch.cat(halves), whole)
    assert not torch.equal(diff_augment(x, policy, torch.Generator().manual_seed(6)), whole)


def test_diff_augment_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        diff_augment(torch.zeros(1, 3, 8, 8), ("blur",), torch.Generator())


def test_generate_images_is_deterministic_in_range_and_keeps_mode() -> None:
    torch.manual_seed(0)
    g = Generator(3, 8, 8, 16).train()
    labels = torch.tensor([0, 1, 2, 2, 1])
    a = generate_images(g, labels, seed=3, batch_size=2, device="cpu")
    b = generate_images(g, labels, seed=3, batch_size=5, device="cpu")
    assert a.shape == (5, 3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.allclose(a, b, atol=1e-5)  # eval mode: a sample does not depend on its batch (float32 batchings)
    assert not torch.allclose(a, generate_images(g, labels, seed=4, batch_size=5, device="cpu"))
    assert g.training


def test_sample_grid_has_one_row_per_class() -> None:
    g = Generator(3, 8, 8, 16)
    grid = sample_grid(g, per_class=4, seed=0, device="cpu", pad=2)
    assert grid.shape == (3 * 18 + 2, 4 * 18 + 2, 3) and grid.dtype.name == "uint8"


@pytest.mark.parametrize(("fourier", "warp"), [(0, True), (4, True), (4, False)])
def test_save_and_load_generator_round_trip(fourier: int, warp: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = Generator(3, 8, 8, 32, fourier=fourier, fourier_warp=warp).to(memory_format=torch.channels_last)
    g.train()(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))  # non-default BatchNorm statistics
    meta = {"classes": ["a", "b", "c"], "step": 7, "val_fid": 12.5, "run_id": "abc"}
    path = tmp_path / "generator.pt"
    save_generator(path, g, meta)
    raw = checkpoint.load(path)  # weights_only
    assert set(raw) == {"kwargs", "state_dict", "meta"}
    assert raw["kwargs"].get("fourier", 0) == fourier  # files without the key (older models) load as fourier=0
    assert raw["kwargs"].get("fourier_warp", True) == warp  # the key only where it is false
    loaded, loaded_meta = load_generator(path)
    assert loaded_meta == meta and not loaded.training
    labels = torch.tensor([0, 1, 2])
    assert torch.allclose(
        generate_images(loaded, labels, 1, 3, "cpu"), generate_images(g, labels, 1, 3, "cpu"), atol=1e-6
    )


def _attention_blocks(model: torch.nn.Module) -> list[SelfAttention]:
    return [m for m in model.modules() if isinstance(m, SelfAttention)]


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("arch", ["dcgan", "resnet", "vae"])
def test_every_generator_family_draws_images_of_its_class(arch: str, size: int) -> None:
    """The one generator interface, with SAGAN attention at every inner side; the class changes the image."""
    assert attention_sides(size) == tuple(size >> j for j in range(1, layout(size)[1] + 1))
    for attention in (0, *attention_sides(size)):
        torch.manual_seed(0)
        g = build_generator(arch, num_classes=3, z_dim=8, channels=8, image_size=size, attention=attention)
        assert g.arch == arch and (g.z_dim, g.num_classes, g.image_size) == (8, 3, size)
        assert len(_attention_blocks(g)) == (attention > 0)
        z, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
        images = g(z, labels)
        assert images.shape == (4, 3, size, size) and images.min() >= -1 and images.max() <= 1
        images.sum().backward()
        assert all(p.grad is not None for p in g.parameters())
        g.eval()
        assert not torch.allclose(g(z[:1], labels[:1]), g(z[:1], torch.tensor([2])))


@pytest.mark.parametrize("conditioning", ["concat", "projection", "ac", "adc"])
def test_resnet_discriminator_conditions_like_the_dcgan_one(conditioning: str) -> None:
    torch.manual_seed(0)
    d = ResNetDiscriminator(4, 8, 32, conditioning, spectral_norm=True, attention=8).eval()  # type: ignore[arg-type]
    assert len(_attention_blocks(d)) == 1
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a, b = d(x, torch.tensor([0, 0])), d(x, torch.tensor([3, 3]))
    assert a.shape == (2,)
    if conditioning in ("ac", "adc"):  # the logit ignores the label; the class head answers
        assert torch.equal(a, b)
        logits, classes = d(x, torch.tensor([0, 0]), with_classes=True)
        assert torch.equal(logits, a) and classes.shape == (2, 4 * (1 + (conditioning == "adc")))
    else:
        assert not torch.allclose(a, b)
        with pytest.raises(ValueError, match="class logits need a class head"):
            d(x, torch.tensor([0, 0]), with_classes=True)


def test_resnet_generator_takes_the_class_through_conditional_batchnorm() -> None:
    g = ResNetGenerator(3, 8, 8, 16)
    assert g.linear.in_features == 8  # z alone: the class enters through the gains and biases only
    norms = [m for m in g.modules() if type(m).__name__ == "ConditionalBatchNorm"]
    assert len(norms) == 2 * len(g.blocks) and all(not m.bn.affine for m in norms)


def test_attention_starts_as_the_identity_and_attends_across_the_map() -> None:
    torch.manual_seed(0)
    block = SelfAttention(16)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(block(x), x)  # gamma = 0
    with torch.no_grad():
        block.gamma.fill_(1.0)
    y = x.clone()
    y[:, :, 3, 3] += 1.0  # one far position changes every output position
    assert not torch.isclose(block(x)[:, :, 0, 0], block(y)[:, :, 0, 0]).all()


def test_attention_sides_are_checked() -> None:
    with pytest.raises(ValueError, match=r"attention must be 0 or a feature-map side of 32 px \(16, 8, 4\), got 32"):
        Generator(3, 8, 8, 32, attention=32)
    with pytest.raises(ValueError, match="unknown generator arch 'gan'; expected one of dcgan, resnet, vae"):
        build_generator("gan", num_classes=3)


def test_vae_encoder_and_kl() -> None:
    torch.manual_seed(0)
    encoder = VaeEncoder(3, 8, 8, 16)
    mean, log_var = encoder(torch.rand(5, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0, 1]))
    assert mean.shape == log_var.shape == (5, 8)
    zeros = torch.zeros(4, 8)
    assert kl_divergence(zeros, zeros).item() == 0.0  # the posterior is the prior
    mean, log_var = torch.full((4, 8), 0.5), torch.full((4, 8), -1.0)
    expected = 8 * 0.5 * (0.25 + math.exp(-1.0) - 1.0 + 1.0)  # per row: sum over the 8 dimensions
    assert kl_divergence(mean, log_var).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("arch", ["resnet", "vae"])
def test_one_model_file_for_every_family(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = build_generator(arch, num_classes=3, z_dim=8, channels=8, image_size=16, attention=8)
    g.train()(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))  # non-default BatchNorm statistics
    save_generator(tmp_path / "generator.pt", g, {"classes": ["a", "b", "c"]})
    assert checkpoint.load(tmp_path / "generator.pt")["kwargs"]["arch"] == arch
    loaded, _ = load_generator(tmp_path / "generator.pt")
    assert type(loaded) is GENERATORS[arch] and loaded.kwargs == g.kwargs
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(generate_images(loaded, labels, 1, 3, "cpu"), generate_images(g, labels, 1, 3, "cpu"))
    assert isinstance(g, VaeDecoder) == (arch == "vae")


def test_files_without_an_arch_are_dcgans(tmp_path: Path) -> None:
    """Model files written before there were other families: DCGAN kwargs, no ``arch``."""
    g = Generator(3, 8, 8, 16)
    checkpoint.save_model(tmp_path / "old.pt", g, g.kwargs, {"classes": ["a", "b", "c"]})
    loaded, _ = load_generator(tmp_path / "old.pt")
    assert type(loaded) is Generator and loaded.arch == "dcgan"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), g.state_dict().values(), strict=True))


def test_load_generator_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    checkpoint.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a generator model file"):
        load_generator(path)
