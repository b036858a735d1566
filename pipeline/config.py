"""params.yaml -> typed, frozen, validated configuration.

Every key is declared here once; an unknown key, a wrong type or an out-of-range value raises
:class:`ConfigError` naming the key path (``params.yaml: data.patch_size: ...``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.errors import UserError

PARAMS_FILE = "params.yaml"


class ConfigError(UserError):
    """A bad params file, key or value."""


def _check(predicate: Callable[[Any], bool], expected: str) -> Any:
    return field(metadata={"check": (predicate, expected)})


def _positive() -> Any:
    return _check(lambda v: v > 0, "a positive number")


def _non_negative() -> Any:
    return _check(lambda v: v >= 0, "a number >= 0")


def _fraction() -> Any:
    return _check(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool
    rot90: bool
    color_jitter: float = _check(lambda v: 0.0 <= v <= 0.5, "a number in [0, 0.5]")


@dataclass(frozen=True)
class SplitCounts:
    train: int = _positive()
    val: int = _positive()
    test: int = _positive()


@dataclass(frozen=True)
class DataConfig:
    source: Literal["builtin", "folder"]
    folder: str
    classes: tuple[str, ...]
    instances_per_class: int = _check(lambda v: v >= 3, "an integer >= 3 (train, val and test each need a source)")
    source_size: int = _check(lambda v: v >= 64, "an integer >= 64")
    val_fraction: float = _fraction()
    test_fraction: float = _fraction()
    patch_size: int = _check(lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8")
    patches_per_source: int = _positive()
    mosaic_size: int = _check(lambda v: v > 0 and v % 16 == 0, "a positive multiple of 16")
    max_regions: int = _check(lambda v: v >= 2, "an integer >= 2")
    mosaics: SplitCounts
    augment: AugmentConfig
    shard_max_samples: int = _positive()
    min_shards: int = _positive()
    encoding: Literal["png", "raw"]
    workers: int = _non_negative()


@dataclass(frozen=True)
class TrainConfig:
    nproc_per_node: int | Literal["auto"] = _check(lambda v: v == "auto" or v > 0, "'auto' or a positive integer")
    max_restarts: int = _non_negative()
    num_workers: int = _non_negative()
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    compile: bool
    deterministic: bool
    channels_last: bool
    on_params_change: Literal["error", "restart"]


@dataclass(frozen=True)
class VaeConfig:
    kl_weight: float = _positive()
    adversarial: float = _non_negative()


@dataclass(frozen=True)
class GanConfig:
    arch: Literal["dcgan", "resnet", "vae"]  # pipeline.models.gan.GENERATORS
    attention: int = _check(lambda v: v >= 0, "a whole number >= 0 (a feature-map side; 0 = off)")
    z_dim: int = _positive()
    channels: int = _check(lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8")
    fourier: int = _check(lambda v: v >= 0, "a whole number >= 0")
    fourier_warp: bool
    loss: Literal["ns", "hinge", "ls", "wgan-gp"]
    conditioning: Literal["concat", "projection", "ac", "adc"]
    spectral_norm: bool
    lr_g: float = _positive()
    lr_d: float = _positive()
    beta1: float = _fraction()
    beta2: float = _fraction()
    batch_size: int = _positive()
    steps: int = _positive()
    n_critic: int = _positive()
    label_smoothing: float = _check(lambda v: 0.0 <= v < 0.5, "a number in [0, 0.5)")
    ema_decay: float = _fraction()
    diffaug: tuple[Literal["color", "translation", "cutout"], ...]
    r1_gamma: float = _non_negative()
    gp_lambda: float = _non_negative()
    mode_seeking: float = _non_negative()
    sync_bn: bool
    log_every: int = _positive()
    checkpoint_every: int = _positive()
    eval_every: int = _positive()
    eval_samples: int = _positive()
    sample_every: int = _positive()
    vae: VaeConfig


@dataclass(frozen=True)
class FcnConfig:
    channels: int = _positive()
    convs: int = _check(lambda v: 1 <= v <= 4, "an integer in [1, 4]")


@dataclass(frozen=True)
class DeepLabConfig:
    channels: int = _positive()
    blocks: int = _check(lambda v: 1 <= v <= 4, "an integer in [1, 4]")
    output_stride: Literal[8, 16]


@dataclass(frozen=True)
class SegformerConfig:
    dim: int = _positive()
    blocks: int = _check(lambda v: 1 <= v <= 4, "an integer in [1, 4]")


@dataclass(frozen=True)
class RenetConfig:
    channels: int = _positive()
    hidden: int = _positive()
    layers: int = _check(lambda v: 1 <= v <= 4, "an integer in [1, 4]")
    cell: Literal["gru", "lstm"]


@dataclass(frozen=True)
class SegmenterConfig:
    arch: Literal["unet", "fcn", "deeplabv3", "segformer", "renet"]  # pipeline.models.segmenters.SEGMENTERS
    channels: int = _check(lambda v: v > 0 and v % 4 == 0, "a positive multiple of 4")
    depth: int = _check(lambda v: 1 <= v <= 5, "an integer in [1, 5]")
    upsample: Literal["bilinear", "transpose"]
    decoder: Literal["concat", "add"]
    tta: Literal["none", "flip", "d8"]
    dropout: float = _fraction()
    dilated_bottleneck: bool
    sync_bn: bool
    color_augment: float = _check(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
    scale_augment: float = _check(lambda v: 0.0 <= v <= 0.5, "a number in [0, 0.5]")
    lr: float = _positive()
    weight_decay: float = _non_negative()
    schedule: Literal["poly", "cosine"]
    warmup_steps: int = _non_negative()
    batch_size: int = _positive()
    epochs: int = _positive()
    steps_per_epoch: int = _positive()
    ce_weight: float = _non_negative()
    dice_weight: float = _non_negative()
    class_weights: tuple[float, ...]
    log_every: int = _positive()
    checkpoint_every: int = _positive()
    fcn: FcnConfig
    deeplabv3: DeepLabConfig
    segformer: SegformerConfig
    renet: RenetConfig


@dataclass(frozen=True)
class EvaluateConfig:
    fid_features: Literal["texture", "inception"]
    feature_dim: int = _positive()
    feature_steps: int = _positive()
    feature_batch_size: int = _positive()
    feature_lr: float = _positive()
    samples_per_class: int = _check(lambda v: v >= 2, "an integer >= 2")
    batch_size: int = _positive()
    knn_k: int = _positive()


@dataclass(frozen=True)
class GanGate:
    max_fid_ratio: float = _positive()
    min_recall: float = _check(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
    min_diversity: float = _non_negative()
    min_class_fidelity: float = _check(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


@dataclass(frozen=True)
class SegmenterGate:
    min_miou: float = _check(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


@dataclass(frozen=True)
class RegisterConfig:
    gan: GanGate
    segmenter: SegmenterGate


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = _check(lambda v: bool(v), "a non-empty URI")
    experiment: str = _check(lambda v: bool(v), "a non-empty name")
    system_metrics: bool


@dataclass(frozen=True)
class Config:
    seed: int = _non_negative()
    data: DataConfig
    train: TrainConfig
    gan: GanConfig
    segmenter: SegmenterConfig
    evaluate: EvaluateConfig
    register: RegisterConfig
    mlflow: MlflowConfig

    def section_hash(self, *sections: str) -> str:
        """sha256 of the named sections (and the seed), to tie checkpoints to their params."""
        payload = {"seed": self.seed} | {s: to_dict(getattr(self, s)) for s in sections}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def to_dict(obj: Any) -> Any:
    """A config object back to plain YAML/JSON types."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"gan.lr_g": 2e-4, ...}`` from a config object or nested dict, for logging params."""
    out: dict[str, Any] = {}
    for key, value in to_dict(obj).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, path, source)
            except ConfigError:
                continue
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(f"{source}: {path}: expected {names}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
        raise ConfigError(f"{source}: {path}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if value is None:
            value = []
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {path}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{path}[{i}]", source) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    raise ConfigError(f"{source}: {path}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    where = path or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{source}: {path + '.' if path else ''}{key}: unknown key (known keys: {known})")
    kwargs = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name not in data:
            raise ConfigError(f"{source}: {key_path}: missing key")
        value = _convert(hints[name], data[name], key_path, source)
        check = f.metadata.get("check")
        if check and value != "auto" and not check[0](value):
            raise ConfigError(f"{source}: {key_path}: expected {check[1]}, got {data[name]!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _validate_cross(cfg: Config, source: str) -> None:
    d = cfg.data
    if d.val_fraction + d.test_fraction >= 0.9:
        raise ConfigError(f"{source}: data.test_fraction: val_fraction + test_fraction must leave >= 10% for train")
    if d.source == "folder" and not d.folder:
        raise ConfigError(f"{source}: data.folder: required when data.source is 'folder'")
    if d.patch_size > d.source_size or d.mosaic_size > d.source_size:
        raise ConfigError(f"{source}: data.source_size: must be >= patch_size and mosaic_size")
    if cfg.segmenter.class_weights and cfg.data.classes and len(cfg.segmenter.class_weights) != len(cfg.data.classes):
        raise ConfigError(f"{source}: segmenter.class_weights: expected one weight per class in data.classes")
    learned = {"none": (), "flip": ("flip",), "d8": ("flip", "rot90")}[cfg.segmenter.tta]
    missing = [name for name in learned if not getattr(d.augment, name)]
    if missing:
        raise ConfigError(
            f"{source}: segmenter.tta: {cfg.segmenter.tta!r} averages views the model learns only with "
            f"data.augment.{missing[0]}: true (or set segmenter.tta: none)"
        )
    _validate_gan(cfg, source)
    if isinstance(cfg.train.nproc_per_node, int):
        needed = cfg.train.nproc_per_node * max(1, cfg.train.num_workers)
        if d.min_shards < needed:
            raise ConfigError(
                f"{source}: data.min_shards: expected >= train.nproc_per_node x max(1, train.num_workers) = {needed}, "
                f"got {d.min_shards}"
            )


def _validate_gan(cfg: Config, source: str) -> None:
    gan = cfg.gan
    if gan.fourier and gan.arch != "dcgan":
        raise ConfigError(
            f"{source}: gan.fourier: the Fourier head is the dcgan generator's; set 0 for gan.arch {gan.arch!r}"
        )
    # the inner feature-map sides of G and D (pipeline.models.gan_blocks.attention_sides)
    sides, side = [], cfg.data.patch_size
    while side % 2 == 0 and side // 2 >= 4:
        side //= 2
        sides.append(side)
    if gan.attention and gan.attention not in sides:
        raise ConfigError(
            f"{source}: gan.attention: expected 0 or a feature-map side of {cfg.data.patch_size}-px patches "
            f"({', '.join(map(str, sides))}), got {gan.attention}"
        )


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "gan.steps", 5)`` for overrides (tests, ``dvc exp run -S`` style)."""
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def parse(raw: Any, source: str = PARAMS_FILE) -> Config:
    """Validate a parsed params mapping."""
    cfg = _build(Config, raw, "", source)
    _validate_cross(cfg, source)
    return cfg


def load_raw(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return raw if raw is not None else {}


def load(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate params.yaml, with optional dotted-key overrides."""
    raw = load_raw(path)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse(raw, str(path))
