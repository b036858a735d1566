"""What every segmenter family shares: input normalisation, any input size, test-time views.

A family subclasses :class:`Segmenter`, stores its constructor arguments in ``kwargs`` (the model file
rebuilds it from them), sets ``multiple`` (the input side its network needs: its total stride) and
implements :meth:`Segmenter.network`. ``logits`` pads any input to that multiple and crops the result;
``forward`` in eval mode averages the class probabilities over the dihedral views of the input
(``tta``: ``"flip"`` = the 4 flips, ``"d8"`` = the 4 rotations x 2 flips; test-time augmentation): a
texture's class does not change when it is flipped or turned, but the single view's mistakes, mostly
within a few pixels of a region border, do. Training (train mode) always sees one view.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tta = Literal["none", "flip", "d8"]
# Images arrive in [0, 1]; the model normalises them itself so every caller (training, evaluation,
# serving) feeds the same thing. Texture pixels have no dataset-wide colour prior worth fitting.
INPUT_MEAN = 0.5
INPUT_STD = 0.25
# Test-time views: (quarter turns, horizontal flip) pairs, each undone on the prediction.
TTA_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flip": ((0, False), (0, True), (2, False), (2, True)),  # identity, h-flip, rot180 = h+v flip, v-flip
    "d8": tuple((k, flip) for k in range(4) for flip in (False, True)),
}


def check_tta(tta: str) -> None:
    if tta not in TTA_VIEWS:
        raise ValueError(f"tta must be one of {', '.join(TTA_VIEWS)}, got {tta!r}")


class Segmenter(nn.Module, ABC):
    """``forward(images (B, 3, H, W) in [0, 1]) -> logits (B, num_classes, H, W)``, any H and W.

    In eval mode with ``tta`` the logits are the log of the views' mean probabilities (argmax as usual).
    """

    arch: ClassVar[str]  # the ``segmenter.arch`` name of the family, recorded in model files
    kwargs: dict[str, Any]
    multiple: int

    @property
    def num_classes(self) -> int:
        return self.kwargs["num_classes"]

    def forward(self, images: Tensor) -> Tensor:
        """Logits of one view in train mode; in eval mode with ``tta``, log of the views' mean probabilities."""
        views = TTA_VIEWS[self.kwargs["tta"]]
        if self.training or len(views) == 1:
            return self.logits(images)
        probs = None
        for turns, flip in views:
            x = images.rot90(turns, (2, 3))
            p = self.logits(x.flip(3) if flip else x).float().softmax(1)
            p = (p.flip(3) if flip else p).rot90(-turns, (2, 3))
            probs = p if probs is None else probs + p
        return (probs / len(views)).clamp_min(torch.finfo(probs.dtype).tiny).log()

    def logits(self, images: Tensor) -> Tensor:
        """The network's logits for one view of ``images`` (no test-time augmentation)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        x = (images - INPUT_MEAN) / INPUT_STD
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        if pad_h or pad_w:  # any size in, same size out: pad to the network's multiple, crop the logits
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        return self.network(x)[..., :h, :w]

    @abstractmethod
    def network(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes, H, W) of normalised images whose sides are multiples of ``multiple``."""
