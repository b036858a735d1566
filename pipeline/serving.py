"""MLflow pyfunc models for the texture segmenter and GAN, and the CLI's ``generate``/``segment`` helpers.

A logged model holds the weights file (``models/segmenter/model.pt`` or ``models/gan/generator.pt``)
as a pyfunc artifact plus a three-line model-code file that instantiates a class from this module, so
loading it needs the installed ``texture-pipeline`` package (``pip install`` of this project) and
nothing pickled. Weights load with ``weights_only=True`` on the CPU, wherever they were trained.

Interfaces (see DESIGN.md §3):

- ``texture-segmenter``: uint8 array (N, H, W, 3) -> int64 array (N, H, W) of class indices.
- ``texture-gan``: table with ``class`` (name or index) and ``seed`` -> uint8 images (N, H, W, 3);
  row ``(class, seed)`` always draws the same image.
"""

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd

from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

ARTIFACT = "weights"  # key of the weights file in the pyfunc's ``context.artifacts``
PREDICT_BATCH = 16  # images per forward pass: bounds memory for large requests


class UnknownClassError(UserError, ValueError):
    """A class name or index the model was not trained on."""


def resolve_class(value: Any, classes: Sequence[str]) -> int:
    """A class name, an index, or an index written as text -> the class index."""
    if isinstance(value, str):
        if value in classes:
            return classes.index(value)
        if not value.strip().isdigit():
            raise UnknownClassError(f"unknown class {value!r}; known classes: {', '.join(classes)}")
        value = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(classes):
        return int(value)
    raise UnknownClassError(f"unknown class {value!r}; expected a name or an index in [0, {len(classes) - 1}]")


def to_uint8_images(images: "torch.Tensor") -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8."""
    import torch

    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """``texture-segmenter``: per-pixel class indices of RGB images."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from pipeline.models.unet import load_segmenter

        self.model, meta = load_segmenter(context.artifacts[ARTIFACT], device="cpu")
        self.classes = list(meta["classes"])

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> np.ndarray:
        import torch

        images = np.asarray(model_input)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got shape {images.shape}")
        masks = np.empty(images.shape[:3], dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, len(images), PREDICT_BATCH):
                chunk = torch.tensor(images[start : start + PREDICT_BATCH], dtype=torch.uint8)
                logits = self.model(chunk.permute(0, 3, 1, 2).float() / 255.0)
                masks[start : start + len(chunk)] = logits.argmax(1).numpy()
        return masks


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """``texture-gan``: one image per ``(class, seed)`` row from the EMA generator."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from pipeline.models.gan import load_generator

        self.generator, meta = load_generator(context.artifacts[ARTIFACT], device="cpu")
        self.classes = list(meta["classes"])

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> np.ndarray:
        import torch

        from pipeline.models.gan import generate_images

        missing = {"class", "seed"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input table needs columns 'class' and 'seed'; missing {sorted(missing)}")
        if model_input.empty:
            raise ValueError("input table has no rows")
        labels = [resolve_class(v, self.classes) for v in model_input["class"]]
        images = [
            generate_images(self.generator, torch.tensor([label]), seed=int(seed), batch_size=1, device="cpu")
            for label, seed in zip(labels, model_input["seed"], strict=True)
        ]
        return to_uint8_images(torch.cat(images))


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def generate_to_folder(model_uri: str, classes: list[str], n: int, seed: int, out_dir: Path) -> list[Path]:
    """``n`` images per class (seeds ``seed .. seed+n-1``) from a registered GAN -> ``out_dir/<class>_NNNN.png``."""
    from pipeline.checkpoint import atomic_write_bytes
    from pipeline.registry import load_pyfunc

    if n < 1:
        raise UserError(f"--num: expected a positive number of images per class, got {n}")
    model = load_pyfunc(model_uri)
    known = list(model.metadata.metadata["classes"])
    names = [known[resolve_class(c, known)] for c in classes]
    table = pd.DataFrame(
        {"class": [name for name in names for _ in range(n)], "seed": [seed + i for _ in names for i in range(n)]}
    )
    images = model.predict(table)
    written = []
    for (name, index), image in zip(((name, i) for name in names for i in range(n)), images, strict=True):
        path = Path(out_dir) / f"{name}_{index:04d}.png"
        atomic_write_bytes(path, _png_bytes(image))
        written.append(path)
    return written


def palette(num_classes: int) -> np.ndarray:
    """Distinct RGB colours, one per class: evenly spaced hues, alternating brightness."""
    import colorsys

    hsv = [(i / max(num_classes, 1), 0.8, 1.0 if i % 2 == 0 else 0.65) for i in range(num_classes)]
    return (np.array([colorsys.hsv_to_rgb(*c) for c in hsv]).reshape(-1, 3) * 255).round().astype(np.uint8)


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def segment_to_folder(model_uri: str, inputs: list[Path], out_dir: Path) -> list[Path]:
    """Label every pixel of ``inputs`` with a registered segmenter.

    Writes ``out_dir/<stem>.mask.png`` (8-bit class indices) and ``out_dir/<stem>.preview.png``
    (input and colourised mask side by side); returns the mask paths.
    """
    from pipeline.checkpoint import atomic_write_bytes
    from pipeline.registry import load_pyfunc

    stems = [Path(p).stem for p in inputs]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise UserError(f"inputs: several files named {duplicates[0]!r} would write the same mask")
    images = [_read_rgb(Path(p)) for p in inputs]
    model = load_pyfunc(model_uri)
    classes = list(model.metadata.metadata["classes"])
    if len(classes) > 256:
        raise UserError(f"{model_uri}: {len(classes)} classes do not fit an 8-bit mask")
    colours = palette(len(classes))
    written = []
    for stem, image in zip(stems, images, strict=True):
        mask = np.asarray(model.predict(image[None]))[0].astype(np.uint8)
        path = Path(out_dir) / f"{stem}.mask.png"
        atomic_write_bytes(path, _png_bytes(mask))
        atomic_write_bytes(path.with_name(f"{stem}.preview.png"), _png_bytes(np.concatenate([image, colours[mask]], 1)))
        written.append(path)
    return written
