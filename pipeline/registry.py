"""MLflow Model Registry: log the pyfunc models into their training runs, register versions with lineage,
gate them, and move the ``champion``/``challenger`` aliases.

A version that passes :mod:`pipeline.gate` (the ``register.*`` thresholds and the champion comparison)
becomes ``champion``, any other ``challenger``. Registering weights that are already
registered judges their version again with the current thresholds and moves the aliases to match.
"""

from __future__ import annotations

import os
import re
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import config
from pipeline.config import Config
from pipeline.errors import UserError, one_line
from pipeline.gate import check_metrics, compare_with_champion, gate, metric_tags, metrics_from_tags
from pipeline.serving import ARTIFACT
from pipeline.tracking import (
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_MANIFEST,
    TAG_PARAMS_HASH,
    TAG_STAGE,
    file_sha256,
    read_run_json,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel
    from mlflow.pyfunc import PyFuncModel

MODEL_NAMES = {"gan": "texture-gan", "segmenter": "texture-segmenter"}
MODEL_FILES = {"gan": "generator.pt", "segmenter": "model.pt"}
CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_MODEL_SHA = "model.sha256"
TAG_GATE_PASSED = "gate.passed"
TAG_GATE_REASON = "gate.reason"
DESCRIPTIONS = {
    "gan": "Conditional texture generator (any gan.arch family). pyfunc input: table with 'class' (name or "
    "index) and 'seed'; output: uint8 images (N, H, W, 3). Needs the texture-pipeline package installed.",
    "segmenter": "Texture segmenter (any segmenter.arch family). pyfunc input: uint8 images (N, H, W, 3); "
    "output: int64 class indices (N, H, W), class names in the model metadata. Needs the texture-pipeline "
    "package installed.",
}
MODEL_CODE = '''"""MLflow model code: the pyfunc class lives in the installed texture-pipeline package."""
from mlflow.models import set_model

from pipeline.serving import {cls}

set_model({cls}())
'''


def kind_of(model_name: str) -> str:
    for kind, name in MODEL_NAMES.items():
        if name == model_name:
            return kind
    raise UserError(f"unknown model {model_name!r}; expected one of {', '.join(MODEL_NAMES.values())}")


# --- connection and lookups -------------------------------------------------------------------------------


def _cli_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``mlflow.tracking_uri`` of ./params.yaml if present, else MLflow's default."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if Path(config.PARAMS_FILE).is_file():
        return config.load(config.PARAMS_FILE).mlflow.tracking_uri
    import mlflow

    return mlflow.get_tracking_uri()


def _check_reachable(uri: str) -> None:
    """Fail in seconds, not after MLflow's retry schedule, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=10)
    except requests.RequestException as exc:
        raise UserError(
            f"MLflow tracking server {uri} is not reachable ({type(exc).__name__}); "
            "start it or fix MLFLOW_TRACKING_URI / mlflow.tracking_uri"
        ) from None


def connect(cfg: Config | None = None) -> tuple[MlflowClient, str]:
    """An ``MlflowClient`` for the configured tracking (and registry) URI, and that URI.

    Without ``cfg`` (``python -m pipeline generate/segment``) the URI comes from ``MLFLOW_TRACKING_URI``
    or ./params.yaml.
    """
    import mlflow

    uri = tracking_uri(cfg) if cfg is not None else _cli_tracking_uri()
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri), uri


def registered_model(client: MlflowClient, name: str, uri: str) -> RegisteredModel:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"registered model {name!r} not found at {uri} (the register stage creates it)") from None
        raise UserError(f"{uri}: cannot read registered model {name!r}: {one_line(exc)}") from None


def _versions(client: MlflowClient, name: str, run_id: str | None = None) -> list[ModelVersion]:
    query = f"name = '{name}'" + (f" and run_id = '{run_id}'" if run_id else "")
    return sorted(client.search_model_versions(query), key=lambda mv: int(mv.version))


def model_version(
    client: MlflowClient, name: str, uri: str, version: str | None = None, alias: str | None = None
) -> ModelVersion:
    """A version by number, by alias, or the latest; one clear error when the model, version or alias is missing."""
    model = registered_model(client, name, uri)
    if alias is not None:
        if alias not in model.aliases:
            known = ", ".join(f"{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "none"
            raise UserError(f"registered model {name!r} has no alias {alias!r} at {uri} (aliases: {known})")
        version = str(model.aliases[alias])
    versions = _versions(client, name)
    if not versions:
        raise UserError(f"registered model {name!r} has no versions at {uri}")
    if version is None:
        return client.get_model_version(name, versions[-1].version)
    if str(version) not in {str(mv.version) for mv in versions}:
        known = ", ".join(str(mv.version) for mv in versions)
        raise UserError(f"registered model {name!r} has no version {version!r} at {uri} (versions: {known})")
    return client.get_model_version(name, str(version))


def load_pyfunc(model_uri: str) -> PyFuncModel:
    """``mlflow.pyfunc.load_model`` with one clear error for a missing model, version or alias."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client, uri = connect()
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if match:
        name, alias, version = match.groups()
        model_version(client, name, uri, version=version, alias=alias)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise UserError(f"{model_uri}: cannot load model ({one_line(exc)})") from None


# --- logging and registration -----------------------------------------------------------------------------


def _pip_requirements() -> list[str]:
    """The packages the pyfunc imports, pinned to this environment; the project itself is ``pip install``-ed."""
    return [
        f"{pkg}=={importlib_metadata.version(pkg).split('+')[0]}"
        for pkg in ("mlflow", "torch", "numpy", "pandas", "pillow")
    ]


def _signature_and_example(kind: str, classes: list[str]) -> tuple[Any, Any]:
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema, TensorSpec

    if kind == "segmenter":
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]),
        )
        example = np.random.default_rng(0).integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    else:
        signature = ModelSignature(
            inputs=Schema([ColSpec(AnyType(), "class"), ColSpec("long", "seed")]),
            outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        )
        example = pd.DataFrame({"class": [classes[0], 1 % len(classes)], "seed": [0, 1]})
    return signature, example


def log_pyfunc(kind: str, model_file: Path, run_id: str, experiment_id: str, sha256: str) -> Any:
    """Log ``model_file`` as a pyfunc model of training run ``run_id``; returns MLflow's ``ModelInfo``."""
    import mlflow
    from mlflow.models import Model

    if kind == "gan":
        from pipeline.models.gan import load_generator as load
    else:
        from pipeline.models.segmenters import load_segmenter as load
    _, meta = load(model_file, device="cpu")
    classes = list(meta["classes"])
    signature, example = _signature_and_example(kind, classes)
    cls = "GeneratorModel" if kind == "gan" else "SegmenterModel"
    # The logged model belongs to the run's experiment, not to whichever experiment is active here.
    mlflow.set_experiment(experiment_id=experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / f"{MODEL_NAMES[kind].replace('-', '_')}.py"
        code.write_text(MODEL_CODE.format(cls=cls))
        return Model.log(
            artifact_path=None,
            name=MODEL_NAMES[kind],
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(code),
            artifacts={ARTIFACT: str(model_file)},
            signature=signature,
            input_example=example,
            pip_requirements=_pip_requirements(),
            metadata={
                "classes": classes,
                "kind": kind,
                "model_sha256": sha256,
                "source_run_id": run_id,
                "requires": "pip install the texture-pipeline project (provides pipeline.serving)",
            },
            tags={TAG_MODEL_SHA: sha256},
        )


def _ensure_registered_model(client: MlflowClient, kind: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(MODEL_NAMES[kind], description=DESCRIPTIONS[kind])
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _training_run(client: MlflowClient, run_id: str, record: dict[str, Any], uri: str, where: Path) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"{where}: training run {run_id} not found at {uri} (it was logged to {record.get('tracking_uri')}); "
            "register against that store, or retrain with this one"
        ) from None


def _description(name: str, run: Any, train_stage: str, dvc_stage: str) -> str:
    tags = run.data.tags
    commit = tags.get(TAG_GIT_COMMIT, "unknown")
    if commit == "unknown":
        how = "reproduce with: dvc repro (no git commit was recorded at training time)"
    else:
        how = f"reproduce with: git checkout {commit} && dvc repro"
        if tags.get(TAG_GIT_DIRTY) == "true":
            how += " (the working tree had uncommitted changes at training time)"
    run_id = run.info.run_id
    return f"{name} trained by DVC stage {train_stage}, MLflow run {run_id}, registered by DVC stage {dvc_stage}. {how}"


def _record(name: str, mv: ModelVersion, passed: bool, reason: str, created: bool, uri: str) -> dict[str, Any]:
    return {
        "model": name,
        "version": str(mv.version),
        "model_uri": f"models:/{name}/{mv.version}",
        "aliases": sorted(mv.aliases),
        "gate_passed": passed,
        "reason": reason,
        "created": created,
        "run_id": mv.run_id,
        "model_sha256": mv.tags.get(TAG_MODEL_SHA),
        "tracking_uri": uri,
    }


def register_model(
    cfg: Config, kind: str, model_dir: Path, metrics: dict[str, Any], dvc_stage: str = "register"
) -> dict[str, Any]:
    """Log, register, gate and alias the model in ``model_dir``; returns the registry record.

    Idempotent: when a version of this model already exists for the same training run and the same
    model-file sha256, nothing is logged: that version is judged again with the current params and returned
    (``created: False``), see :func:`_rejudge`.
    """

    name = MODEL_NAMES[kind]
    check_metrics(kind, metrics, f"{kind} metrics")
    model_dir = Path(model_dir)
    model_file = model_dir / MODEL_FILES[kind]
    if not model_file.is_file():
        raise UserError(f"{model_file}: model file not found (run the train_{kind} stage first)")
    record = read_run_json(model_dir)
    run_id = record.get("run_id")
    if not run_id:
        raise UserError(f"{model_dir / 'run.json'}: no run_id (training did not log to MLflow)")
    client, uri = connect(cfg)
    run = _training_run(client, run_id, record, uri, model_dir / "run.json")
    sha256 = file_sha256(model_file)
    _ensure_registered_model(client, kind)
    for mv in _versions(client, name, run_id):
        if mv.tags.get(TAG_MODEL_SHA) == sha256:
            passed, reason = _rejudge(cfg, client, kind, mv, metrics, uri)
            return _record(name, client.get_model_version(name, mv.version), passed, reason, False, uri)

    info = log_pyfunc(kind, model_file, run_id, run.info.experiment_id, sha256)
    champion_version = registered_model(client, name, uri).aliases.get(CHAMPION)
    champion = client.get_model_version(name, str(champion_version)) if champion_version is not None else None
    gate_ok, gate_reason = gate(cfg, kind, metrics)
    beats, comparison = compare_with_champion(kind, metrics, champion)
    passed = gate_ok and beats
    reason = f"gate {'passed' if gate_ok else 'failed'} ({gate_reason}); {comparison}"
    train_stage = run.data.tags.get(TAG_STAGE, f"train_{kind}")
    # Lineage: the run id is the version's own field and the stages and a dirty tree are in its description.
    tags = metric_tags(kind, metrics) | {
        TAG_GIT_COMMIT: run.data.tags.get(TAG_GIT_COMMIT, "unknown"),
        TAG_MANIFEST: run.data.tags.get(TAG_MANIFEST, "unknown"),
        TAG_PARAMS_HASH: run.data.tags.get(TAG_PARAMS_HASH, "unknown"),
        TAG_MODEL_SHA: sha256,
        TAG_GATE_PASSED: str(passed).lower(),
        TAG_GATE_REASON: reason,
    }
    mv = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=run_id,
        tags=tags,
        description=_description(name, run, train_stage, dvc_stage),
        model_id=info.model_id,
    )
    client.set_registered_model_alias(name, CHAMPION if passed else CHALLENGER, mv.version)
    return _record(name, client.get_model_version(name, mv.version), passed, reason, True, uri)


def _rejudge(
    cfg: Config, client: MlflowClient, kind: str, mv: ModelVersion, metrics: dict[str, Any], uri: str
) -> tuple[bool, str]:
    """Gate an already registered version again with the current ``register.*`` params and the current champion,
    move the aliases to match and store the verdict in its tags; returns (passed, reason).

    A passing version becomes (or stays) ``champion``; a champion that now fails loses the alias (no version is
    champion until one passes or is promoted) and becomes ``challenger``, like any other failing version.
    """
    name, version = mv.name, str(mv.version)
    aliases = registered_model(client, name, uri).aliases
    previous = aliases.get(CHAMPION)
    is_champion = previous is not None and str(previous) == version
    champion = client.get_model_version(name, str(previous)) if previous is not None else None
    gate_ok, gate_reason = gate(cfg, kind, metrics)
    beats, comparison = compare_with_champion(kind, metrics, champion, version)
    passed = gate_ok and beats
    parts = [f"gate {'passed' if gate_ok else 'failed'} ({gate_reason})"]
    if passed and is_champion:
        parts += [comparison, "keeps champion"]
    elif passed:
        parts += [comparison, f"champion: {f'v{previous}' if previous is not None else 'unset'} -> v{version}"]
        client.set_registered_model_alias(name, CHAMPION, version)
        if str(aliases.get(CHALLENGER)) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
    else:
        if is_champion:
            parts.append(f"v{version} loses champion (no version is champion now) and becomes challenger")
            client.delete_registered_model_alias(name, CHAMPION)
        else:
            parts += [comparison, f"v{version} is challenger"]
        client.set_registered_model_alias(name, CHALLENGER, version)
    reason = "; ".join(parts)
    tags = {k: v for k, v in metric_tags(kind, metrics).items() if mv.tags.get(k) != v}
    for key, value in (tags | {TAG_GATE_PASSED: str(passed).lower(), TAG_GATE_REASON: reason}).items():
        client.set_model_version_tag(name, version, key, value)
    return passed, reason


# --- promotion by hand ------------------------------------------------------------------------------------


def promote(cfg: Config, model_name: str, version: str | None, alias: str, force: bool) -> str:
    """Move ``alias`` to a version (default: the latest), gated like the register stage unless ``force``.

    Returns the report (the gate and the champion comparison); a refused promotion is a ``UserError``.
    """
    from mlflow.exceptions import MlflowException

    kind = kind_of(model_name)
    client, uri = connect(cfg)
    mv = model_version(client, model_name, uri, version=version)
    aliases = registered_model(client, model_name, uri).aliases
    previous = aliases.get(alias)
    lines = [f"{model_name} v{mv.version} (run {mv.run_id}) -> {alias}"]
    if force:
        lines.append("  gate and champion comparison skipped (--force)")
    elif alias == CHAMPION:
        metrics = metrics_from_tags(kind, mv.tags, f"{model_name} v{mv.version} tags")
        champion = client.get_model_version(model_name, str(previous)) if previous is not None else None
        gate_ok, gate_reason = gate(cfg, kind, metrics)
        beats, comparison = compare_with_champion(kind, metrics, champion, mv.version)
        lines += [
            f"  gate: {'pass' if gate_ok else 'FAIL'}: {gate_reason}",
            f"  champion: {'pass' if beats else 'FAIL'}: {comparison}",
        ]
        if not (gate_ok and beats):
            why = "; ".join(r for ok, r in ((gate_ok, gate_reason), (beats, comparison)) if not ok)
            raise UserError(f"{model_name} v{mv.version} not promoted to {alias}: {why} (--force skips the gate)")
    try:
        client.set_registered_model_alias(model_name, alias, mv.version)
        if alias == CHAMPION and str(aliases.get(CHALLENGER)) == str(mv.version):
            client.delete_registered_model_alias(model_name, CHALLENGER)
    except MlflowException as exc:
        raise UserError(f"{model_name}: cannot set alias {alias!r}: {one_line(exc)}") from None
    was = f"v{previous}" if previous is not None else "unset"
    lines.append(f"alias {alias!r}: {was} -> v{mv.version}")
    return "\n".join(lines)
