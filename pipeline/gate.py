"""The promotion gate: the headline metrics a registered model needs, the thresholds of ``register.*`` and the
comparison with the current champion.

A version passes when its evaluation metrics clear the thresholds in ``params.yaml`` (for the GAN:
``fid_ratio``, its FID over the untrained generator's FID in the same features, which does not depend on
the extractor's scale, minimum recall, diversity and class fidelity, so a collapsed or class-blind
generator never passes) *and* it beats the current champion on the same metric (for the GAN: FID from the
same feature extractor; FIDs from different extractors are not comparable, so that comparison is skipped
and the reason says so).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config
from pipeline.errors import UserError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

REQUIRED_METRICS = {
    "gan": ("fid", "fid_ratio", "recall", "diversity", "class_fidelity", "fid_features"),
    "segmenter": ("miou",),
}
# A version's tags, 12 at most: these headline metrics (the gate's and the champion comparison's), the gate
# verdict (its reason names the thresholds) and lineage. The whole evaluation stays in the training run.
TAG_METRICS = {"gan": REQUIRED_METRICS["gan"], "segmenter": (*REQUIRED_METRICS["segmenter"], "pixel_accuracy")}


def read_metrics(path: Path, kind: str) -> dict[str, Any]:
    """An evaluation metrics file (``metrics/gan.json`` / ``metrics/segmenter.json``) with its required keys."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read metrics ({exc})") from None
    check_metrics(kind, metrics, str(path))
    return metrics


def check_metrics(kind: str, metrics: Any, source: str) -> None:
    missing = [k for k in REQUIRED_METRICS[kind] if not isinstance(metrics, dict) or k not in metrics]
    if missing:
        raise UserError(f"{source}: missing {', '.join(repr(k) for k in missing)} (needed by the {kind} gate)")


def gate(cfg: Config, kind: str, metrics: dict[str, Any]) -> tuple[bool, str]:
    """The thresholds of ``register.<kind>`` in params: (passed, which checks passed or failed and why)."""
    if kind == "gan":
        g = cfg.register.gan
        ratio, recall, diversity = (number(metrics[k]) for k in ("fid_ratio", "recall", "diversity"))
        # A conditional generator that ignores its class (or was measured before class fidelity existed) fails.
        fidelity = number(metrics.get("class_fidelity"))
        checks = [
            (ratio <= g.max_fid_ratio, f"fid_ratio {ratio:.4g} {{}} max_fid_ratio {g.max_fid_ratio:g}", "<=", ">"),
            (recall >= g.min_recall, f"recall {recall:.4g} {{}} min_recall {g.min_recall:g}", ">=", "<"),
            (
                diversity >= g.min_diversity,
                f"diversity {diversity:.4g} {{}} min_diversity {g.min_diversity:g}",
                ">=",
                "<",
            ),
            (
                fidelity >= g.min_class_fidelity,
                f"class_fidelity {fidelity:.4g} {{}} min_class_fidelity {g.min_class_fidelity:g}",
                ">=",
                "<",
            ),
        ]
    else:
        miou = number(metrics["miou"])
        min_miou = cfg.register.segmenter.min_miou
        checks = [(miou >= min_miou, f"miou {miou:.4g} {{}} min_miou {min_miou:g}", ">=", "<")]
    passed = all(ok for ok, *_ in checks)
    return passed, ", ".join(text.format(yes if ok else no) for ok, text, yes, no in checks)


def number(value: Any) -> float:
    """A metric value (float, tag text, or None for a NaN in the metrics file) as a float; NaN when absent."""
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def short_features(features: str | None) -> str:
    """A feature extractor's name for messages: ``inception``, or the first 12 hex digits of its sha256."""
    return str(features)[:12]


def compare_with_champion(
    kind: str, metrics: dict[str, Any], champion: ModelVersion | None, version: str | None = None
) -> tuple[bool, str]:
    """Does a version with ``metrics`` beat ``champion``? (True, why) when there is nothing comparable."""
    if champion is None:
        return True, "no current champion"
    if version is not None and str(champion.version) == str(version):
        return True, f"v{version} is the current champion"
    name = f"champion v{champion.version}"
    if kind == "gan":
        theirs, ours = champion.tags.get("fid_features"), str(metrics["fid_features"])
        if theirs != ours:
            return True, (
                f"{name}'s FID came from feature extractor {short_features(theirs)}, this one from "
                f"{short_features(ours)}: not comparable, comparison skipped"
            )
        key, lower_is_better = "fid", True
    else:
        key, lower_is_better = "miou", False
    value, best = number(metrics[key]), number(champion.tags.get(key))
    if math.isnan(best):
        return True, f"{name} has no {key} tag: comparison skipped"
    beats = value < best if lower_is_better else value > best
    sign = ("<" if beats else ">=") if lower_is_better else (">" if beats else "<=")
    return beats, f"{key} {value:.4g} {sign} {name}'s {best:.4g}"


def metrics_from_tags(kind: str, tags: dict[str, str], label: str) -> dict[str, Any]:
    """The gate's metrics back from a version's tags."""
    check_metrics(kind, tags, label)
    return {k: tags[k] if k == "fid_features" else number(tags[k]) for k in REQUIRED_METRICS[kind]}


def metric_tags(kind: str, metrics: dict[str, Any]) -> dict[str, str]:
    """The :data:`TAG_METRICS` of ``kind`` as version tags (none for a value that is None: NaN in the metrics file)."""
    return {key: str(metrics[key]) for key in TAG_METRICS[kind] if metrics.get(key) is not None}
