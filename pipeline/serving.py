"""The MLflow pyfunc models of the texture segmenter and GAN (the classes a logged model's code file names).

A logged model holds the weights file (``models/segmenter/model.pt`` or ``models/gan/generator.pt``)
as a pyfunc artifact plus a three-line model-code file that instantiates a class from this module, so
loading it needs the installed ``texture-pipeline`` package (``pip install`` of this project) and
nothing pickled. Weights load with ``weights_only=True`` on the CPU, wherever they were trained.

Interfaces (see DESIGN.md §3):

- ``texture-segmenter``: uint8 array (N, H, W, 3) -> int64 array (N, H, W) of class indices.
- ``texture-gan``: table with ``class`` (name or index) and ``seed`` -> uint8 images (N, H, W, 3);
  row ``(class, seed)`` always draws the same image.

Models logged by every version of this project name ``pipeline.serving``, so these classes stay here; the CLI's
use of registered models is :mod:`pipeline.use`.
"""

from collections.abc import Sequence
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pipeline.errors import UserError
from pipeline.images import to_uint8

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


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """``texture-segmenter``: per-pixel class indices of RGB images."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from pipeline.models.segmenters import load_segmenter

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
        return to_uint8(torch.cat(images))
