"""Batch augmentations: mask alignment under every geometric transform, colour changes that keep structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.augment import augment_batch, color_augment


def _blocky_masks(b: int, size: int, num_classes: int, seed: int) -> torch.Tensor:
    """Random piecewise-constant masks (4x4 cells of random classes, upsampled) plus a few single pixels."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, num_classes, (b, 1, 4, 4), generator=g).float()
    masks = F.interpolate(cells, size=(size, size), mode="nearest")[:, 0].long()
    flat = masks.view(b, -1)
    idx = torch.randint(0, size * size, (b, 8), generator=g)
    flat.scatter_(1, idx, torch.randint(0, num_classes, (b, 8), generator=g))
    return masks


@pytest.mark.parametrize("num_classes", [3, 10])
@pytest.mark.parametrize(
    "options",
    [
        {"flip": True, "rot90": False, "scale_range": None},
        {"flip": False, "rot90": True, "scale_range": None},
        {"flip": False, "rot90": False, "scale_range": (0.5, 0.9)},
        {"flip": False, "rot90": False, "scale_range": (1.1, 2.0)},
        {"flip": True, "rot90": True, "scale_range": (0.75, 1.25)},
    ],
)
def test_mask_decodes_from_augmented_image(num_classes: int, options: dict) -> None:
    """The mask encoded as the image (one class per channel) decodes to the augmented mask, for many seeds."""
    for seed in range(25):
        masks = _blocky_masks(4, 24, num_classes, seed)
        images = F.one_hot(masks, num_classes).permute(0, 3, 1, 2).float()
        gen = torch.Generator().manual_seed(seed)
        aug_images, aug_masks = augment_batch(images, masks, num_classes, gen, **options)
        assert aug_images.shape == images.shape and aug_masks.shape == masks.shape
        assert aug_masks.dtype == torch.int64
        assert torch.equal(aug_images.argmax(1), aug_masks), f"misaligned at seed {seed} with {options}"


def test_rgb_mask_alignment_is_pixel_exact_without_scaling() -> None:
    """Flips and quarter turns move RGB pixels and labels together: each label keeps its own colour."""
    palette = torch.rand(10, 3, generator=torch.Generator().manual_seed(0))
    for seed in range(20):
        masks = _blocky_masks(6, 16, 10, seed)
        images = palette[masks].permute(0, 3, 1, 2)
        aug_images, aug_masks = augment_batch(
            images, masks, 10, torch.Generator().manual_seed(seed), flip=True, rot90=True, scale_range=None
        )
        assert torch.equal(aug_images, palette[aug_masks].permute(0, 3, 1, 2))


def test_every_transform_occurs_and_is_a_true_flip_or_turn() -> None:
    """Over a batch every one of the 8 flip/turn results shows up, and nothing else does."""
    masks = _blocky_masks(1, 12, 5, 3).expand(64, -1, -1).clone()
    images = torch.rand(1, 3, 12, 12).expand(64, -1, -1, -1).clone()
    aug_images, _ = augment_batch(images, masks, 5, torch.Generator().manual_seed(1), scale_range=None)
    candidates = []
    for k in range(4):
        base = torch.rot90(images[0], k, dims=(-2, -1))
        candidates += [base, base.flip(-1)]
    seen = set()
    for i in range(64):
        matches = [j for j, c in enumerate(candidates) if torch.equal(aug_images[i], c)]
        assert matches, f"sample {i} is not a flip/rotation of the input"
        seen.add(matches[0])
    assert seen == set(range(8))


def test_scaling_changes_content_and_keeps_values_in_range() -> None:
    masks = _blocky_masks(8, 32, 4, 0)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for scale_range in [(0.6, 0.9), (1.1, 1.6)]:
        aug_images, _ = augment_batch(
            images, masks, 4, torch.Generator().manual_seed(5), flip=False, rot90=False, scale_range=scale_range
        )
        assert all(not torch.equal(aug_images[i], images[i]) for i in range(8))
        assert aug_images.min() >= 0.0 and aug_images.max() <= 1.0


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    masks = _blocky_masks(8, 16, 4, 1)
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return augment_batch(images, masks, 4, torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_inputs_are_not_modified_and_bad_arguments_raise() -> None:
    masks = _blocky_masks(2, 16, 4, 2)
    images = torch.rand(2, 3, 16, 16)
    before = images.clone(), masks.clone()
    augment_batch(images, masks, 4, torch.Generator().manual_seed(0))
    assert torch.equal(images, before[0]) and torch.equal(masks, before[1])
    with pytest.raises(ValueError, match="scale_range"):
        augment_batch(images, masks, 4, torch.Generator(), scale_range=(0.2, 1.0))
    with pytest.raises(ValueError, match="masks"):
        augment_batch(images, masks[:, :8], 4, torch.Generator())


def test_non_square_images_only_get_half_turns() -> None:
    masks = _blocky_masks(16, 16, 3, 4)[:, :, :12].contiguous()
    images = F.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    aug_images, aug_masks = augment_batch(images, masks, 3, torch.Generator().manual_seed(0), scale_range=(0.8, 1.2))
    assert aug_images.shape == images.shape
    assert torch.equal(aug_images.argmax(1), aug_masks)


def _few_colour_images(b: int, size: int, seed: int) -> torch.Tensor:
    """Images painted with 3 random colours in random cells, so equal-colour pixel sets are known."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.rand(b, 3, 3, generator=g)  # (image, colour, rgb)
    index = _blocky_masks(b, size, 3, seed)
    return palette.gather(1, index.view(b, -1, 1).expand(-1, -1, 3)).view(b, size, size, 3).permute(0, 3, 1, 2)


def test_colour_augment_is_one_colour_map_per_image() -> None:
    """Pixels of equal colour stay equal (edges and regions survive); values stay in [0, 1]."""
    images = _few_colour_images(16, 16, 0)
    out = color_augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.min() >= 0.0 and out.max() <= 1.0
    for i in range(16):
        colours, inverse = images[i].flatten(1).T.unique(dim=0, return_inverse=True)
        mapped = out[i].flatten(1).T
        for c in range(len(colours)):
            group = mapped[inverse == c]
            assert torch.equal(group, group[:1].expand_as(group))


def test_colour_augment_changes_palettes_in_every_way() -> None:
    images = _few_colour_images(64, 8, 1)
    out = color_augment(images, torch.Generator().manual_seed(3))
    assert all(not torch.allclose(out[i], images[i]) for i in range(64))
    # Channel order: the channel of the largest mean moves in some images and not in others.
    moved = out.mean((2, 3)).argmax(1) != images.mean((2, 3)).argmax(1)
    assert 0 < int(moved.sum()) < 64
    # Saturation: some images come out nearly grey (factor near 0), some more saturated than they went in.
    spread = (out - out.mean(1, keepdim=True)).abs().mean((1, 2, 3))
    before = (images - images.mean(1, keepdim=True)).abs().mean((1, 2, 3))
    assert (spread < 0.2 * before).any() and (spread > before).any()
    assert torch.equal(out, color_augment(images, torch.Generator().manual_seed(3)))
    assert torch.equal(color_augment(images, torch.Generator(), 0.0), images)
    weak = color_augment(images, torch.Generator().manual_seed(3), 0.1)
    weak_spread = (weak - weak.mean(1, keepdim=True)).abs().mean((1, 2, 3))
    assert ((weak_spread / before - 1.0).abs() < 0.2).all()  # strength scales saturation and contrast
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        color_augment(torch.rand(2, 4, 8, 8), torch.Generator())
