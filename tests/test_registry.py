"""Registration, gate, champion comparison, promote CLI and duplicate guard against a real ``mlflow server``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from pipeline import config, registry, tracking
from pipeline import gate as gate_mod
from pipeline.errors import UserError
from tests.conftest import ROOT, write_params

pytest.register_assert_rewrite("tests.mlflow_server")  # imported here before pytest_plugins loads it
from tests.mlflow_server import FakeTraining, MlflowServer, child_env, free_port  # noqa: E402

pytest_plugins = ["tests.mlflow_server"]

SEG = "texture-segmenter"
GAN = "texture-gan"
EXTRACTOR_A = "a" * 64  # sha256 of a texture feature extractor file, as evaluate writes it into fid_features
EXTRACTOR_B = "b" * 64


def seg_metrics(miou: float) -> dict[str, Any]:
    """A ``metrics/segmenter.json`` as evaluate writes it (the headline numbers)."""
    return {
        "miou": miou,
        "pixel_accuracy": 0.9,
        "absent_classes": ["dots"],
        "num_images": 21,
        "num_pixels": 21504,
        "miou_single_view": miou,
        "pixel_accuracy_single_view": 0.9,
    }


def gan_metrics(fid: float, recall: float, features: str = EXTRACTOR_A) -> dict[str, Any]:
    """A ``metrics/gan.json`` as evaluate writes it (the headline numbers)."""
    return {
        "fid": fid,
        "fid_ratio": fid / 300.0,
        "recall": recall,
        "diversity": 0.9,
        "class_fidelity": 0.6,
        "precision": 0.5,
        "density": 0.4,
        "coverage": 0.3,
        "fid_features": features,
        "kid_mean": 0.01,
        "kid_std": 0.001,
        "num_samples": 20,
        "num_real": 32,
        "baselines": {
            "fid_real": 0.3,
            "fid_untrained": 300.0,
            "recall_real": 0.6,
            "recall_untrained": 0.0,
            "diversity_real": 1.0,
            "diversity_untrained": 0.01,
            "num_real_train": 20,
        },
    }


LINEAGE_TAGS = {
    tracking.TAG_GIT_COMMIT,
    tracking.TAG_MANIFEST,
    tracking.TAG_PARAMS_HASH,
    registry.TAG_MODEL_SHA,
    registry.TAG_GATE_PASSED,
    registry.TAG_GATE_REASON,
}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m pipeline: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def champion_version(name: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version)


# --- gate and comparison: pure functions -------------------------------------------------------------------


def test_gate_thresholds(tiny_cfg: config.Config, tmp_path: Path) -> None:
    gate = tiny_cfg.register.gan
    assert (gate.max_fid_ratio, gate.min_recall, gate.min_diversity) == (0.75, 0.05, 0.5)
    floor = f"min_class_fidelity {gate.min_class_fidelity:g}"
    assert gate_mod.gate(tiny_cfg, "gan", gan_metrics(30.0, 0.2)) == (
        True,
        "fid_ratio 0.1 <= max_fid_ratio 0.75, recall 0.2 >= min_recall 0.05, diversity 0.9 >= min_diversity 0.5, "
        f"class_fidelity 0.6 >= {floor}",
    )
    # A conditional generator that draws one class for every label: fine FID, recall and variety, the class ignored.
    one_class = gan_metrics(30.0, 0.2) | {"class_fidelity": 0.1}
    assert gate_mod.gate(tiny_cfg, "gan", one_class) == (
        False,
        "fid_ratio 0.1 <= max_fid_ratio 0.75, recall 0.2 >= min_recall 0.05, diversity 0.9 >= min_diversity 0.5, "
        f"class_fidelity 0.1 < {floor}",
    )
    unmeasured = gan_metrics(30.0, 0.2) | {"class_fidelity": None}  # a null in metrics/gan.json: not proven
    assert not gate_mod.gate(tiny_cfg, "gan", unmeasured)[0]
    collapsed = gan_metrics(40.0, 0.0) | {"diversity": 0.01}  # one output per class: fine FID, no variety
    ok, reason = gate_mod.gate(tiny_cfg, "gan", collapsed)
    assert not ok and "diversity 0.01 < min_diversity 0.5" in reason
    strict = config.load(write_params(tmp_path, {"register.gan.min_recall": 0.02}))
    ok, reason = gate_mod.gate(strict, "gan", gan_metrics(40.0, 0.01))
    assert not ok and "recall 0.01 < min_recall 0.02" in reason
    ok, reason = gate_mod.gate(tiny_cfg, "gan", gan_metrics(228.0, 0.5))
    assert not ok and "fid_ratio 0.76 > max_fid_ratio 0.75" in reason
    assert not gate_mod.gate(tiny_cfg, "gan", gan_metrics(math.nan, 0.5))[0]
    unknown_ratio = gan_metrics(1.0, 0.5) | {"fid_ratio": None}  # a NaN in metrics/gan.json
    assert not gate_mod.gate(tiny_cfg, "gan", unknown_ratio)[0]
    assert gate_mod.gate(tiny_cfg, "segmenter", seg_metrics(0.5)) == (True, "miou 0.5 >= min_miou 0.5")
    assert gate_mod.gate(tiny_cfg, "segmenter", seg_metrics(0.49)) == (False, "miou 0.49 < min_miou 0.5")


def _version(version: str, tags: dict[str, str]) -> ModelVersion:
    return ModelVersion(
        name="m", version=version, creation_timestamp=0, tags=[ModelVersionTag(k, v) for k, v in tags.items()]
    )


def test_compare_with_champion_needs_same_metric_and_extractor() -> None:
    assert gate_mod.compare_with_champion("segmenter", seg_metrics(0.1), None) == (True, "no current champion")
    champion = _version("3", {"miou": "0.7"})
    assert gate_mod.compare_with_champion("segmenter", seg_metrics(0.8), champion) == (
        True,
        "miou 0.8 > champion v3's 0.7",
    )
    assert gate_mod.compare_with_champion("segmenter", seg_metrics(0.7), champion)[0] is False
    assert gate_mod.compare_with_champion("segmenter", seg_metrics(0.1), champion, version="3") == (
        True,
        "v3 is the current champion",
    )
    gan_champion = _version("2", {"fid": "40", "fid_features": EXTRACTOR_A})
    assert gate_mod.compare_with_champion("gan", gan_metrics(45.0, 0.3), gan_champion) == (
        False,
        "fid 45 >= champion v2's 40",
    )
    assert gate_mod.compare_with_champion("gan", gan_metrics(35.0, 0.3), gan_champion)[0] is True
    ok, reason = gate_mod.compare_with_champion("gan", gan_metrics(45.0, 0.3, EXTRACTOR_B), gan_champion)
    assert ok and "not comparable, comparison skipped" in reason and EXTRACTOR_B[:12] in reason
    untagged = _version("1", {"fid_features": EXTRACTOR_A})
    ok, reason = gate_mod.compare_with_champion("gan", gan_metrics(45.0, 0.3), untagged)
    assert ok and "has no fid tag" in reason


def test_metrics_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gan.json"
    path.write_text(json.dumps({"fid": 3.0}))
    missing = (
        r"gan.json: missing 'fid_ratio', 'recall', 'diversity', 'class_fidelity', 'fid_features' "
        r"\(needed by the gan gate\)"
    )
    with pytest.raises(UserError, match=missing):
        gate_mod.read_metrics(path, "gan")
    with pytest.raises(UserError, match=r"segmenter\.json: cannot read metrics"):
        gate_mod.read_metrics(tmp_path / "segmenter.json", "segmenter")


# --- against the real server ---------------------------------------------------------------------------------


def test_registration_has_lineage_and_is_not_duplicated(
    tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining
) -> None:
    model_dir = fake_training("segmenter", seed=1)
    run_id = json.loads((model_dir / "run.json").read_text())["run_id"]
    record = registry.register_model(tiny_cfg, "segmenter", model_dir, seg_metrics(0.7), dvc_stage="register")
    assert record["model"] == SEG and record["version"] == "1" and record["aliases"] == ["champion"]
    assert record["created"] and record["gate_passed"] and record["run_id"] == run_id
    assert record["tracking_uri"] == tracking_server.url
    assert record["reason"] == "gate passed (miou 0.7 >= min_miou 0.5); no current champion"

    client = mlflow.MlflowClient()
    mv = client.get_model_version(SEG, "1")
    run = client.get_run(run_id)
    assert mv.run_id == run_id
    assert set(mv.tags) == {"miou", "pixel_accuracy"} | LINEAGE_TAGS  # the rest of the evaluation is in the run
    assert mv.tags["miou"] == "0.7" and mv.tags["pixel_accuracy"] == "0.9"
    assert mv.tags[tracking.TAG_GIT_COMMIT] == run.data.tags[tracking.TAG_GIT_COMMIT]
    assert mv.tags[tracking.TAG_MANIFEST] == "manifest-1" and mv.tags[tracking.TAG_PARAMS_HASH] == "params-1"
    assert mv.tags[registry.TAG_MODEL_SHA] == tracking.file_sha256(model_dir / "model.pt")
    assert mv.tags[registry.TAG_GATE_PASSED] == "true" and mv.tags[registry.TAG_GATE_REASON] == record["reason"]
    assert "DVC stage train_segmenter" in mv.description and "registered by DVC stage register" in mv.description
    assert "reproduce with: " in mv.description and "dvc repro" in mv.description
    # The logged model belongs to the training run (lineage in the UI: run -> logged model -> version).
    assert mv.source.startswith("models:/m-")  # the REST API does not return model_id: it is in the source
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.experiment_id == run.info.experiment_id
    assert run.data.params["segmenter.channels"] == str(tiny_cfg.segmenter.channels)

    again = registry.register_model(tiny_cfg, "segmenter", model_dir, seg_metrics(0.7))
    assert again["version"] == "1" and not again["created"] and again["aliases"] == ["champion"]
    assert again["reason"] == "gate passed (miou 0.7 >= min_miou 0.5); v1 is the current champion; keeps champion"
    assert [m.version for m in client.search_model_versions(f"name = '{SEG}'")] == ["1"]


def test_champion_moves_only_to_a_better_version_that_passes_the_gate(
    tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining
) -> None:
    steps = [(0.7, ["champion"]), (0.6, ["challenger"]), (0.9, ["champion"]), (0.4, ["challenger"])]
    for seed, (miou, aliases) in enumerate(steps):
        record = registry.register_model(tiny_cfg, "segmenter", fake_training("segmenter", seed), seg_metrics(miou))
        assert record["version"] == str(seed + 1) and record["aliases"] == aliases, record
    assert "miou 0.6 <= champion v1's 0.7" in record_reason(2)
    assert record_reason(4).startswith("gate failed (miou 0.4 < min_miou 0.5)")
    assert champion_version(SEG) == "3"


def record_reason(version: int) -> str:
    return mlflow.MlflowClient().get_model_version(SEG, str(version)).tags[registry.TAG_GATE_REASON]


def test_registering_again_judges_with_the_current_thresholds(
    tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining, tmp_path: Path
) -> None:
    def register(model_dir: Path, miou: float, min_miou: float) -> dict[str, Any]:
        directory = tmp_path / f"min-{min_miou}"
        directory.mkdir(exist_ok=True)
        params = write_params(directory, {"register.segmenter.min_miou": min_miou})
        return registry.register_model(config.load(params), "segmenter", model_dir, seg_metrics(miou))

    first, second = fake_training("segmenter", 0), fake_training("segmenter", 1)
    assert register(first, 0.7, 0.5)["aliases"] == ["champion"]
    assert register(second, 0.6, 0.5)["aliases"] == ["challenger"]
    client = mlflow.MlflowClient()

    kept = register(first, 0.7, 0.65)
    assert kept["aliases"] == ["champion"] and kept["gate_passed"] and not kept["created"]
    assert kept["reason"] == "gate passed (miou 0.7 >= min_miou 0.65); v1 is the current champion; keeps champion"

    demoted = register(first, 0.7, 0.9)
    assert demoted["aliases"] == ["challenger"] and not demoted["gate_passed"]
    assert demoted["reason"] == (
        "gate failed (miou 0.7 < min_miou 0.9); v1 loses champion (no version is champion now) and becomes challenger"
    )
    assert client.get_registered_model(SEG).aliases == {"challenger": "1"}  # v2 gave the alias up
    tags = client.get_model_version(SEG, "1").tags
    assert tags[registry.TAG_GATE_PASSED] == "false" and tags[registry.TAG_GATE_REASON] == demoted["reason"]
    assert set(tags) == {"miou", "pixel_accuracy"} | LINEAGE_TAGS  # judging again adds no tags

    promoted = register(second, 0.6, 0.55)
    assert promoted["aliases"] == ["champion"] and promoted["reason"] == (
        "gate passed (miou 0.6 >= min_miou 0.55); no current champion; champion: unset -> v2"
    )
    back = register(first, 0.7, 0.5)
    assert back["aliases"] == ["champion"]
    assert back["reason"].endswith("miou 0.7 > champion v2's 0.6; champion: v2 -> v1")
    assert client.get_registered_model(SEG).aliases == {"champion": "1"}  # v1's challenger alias went with it
    assert sorted(m.version for m in client.search_model_versions(f"name = '{SEG}'")) == ["1", "2"]


def test_register_stage_reports_the_current_gate(
    tiny_params: Any, tracking_server: MlflowServer, fake_training: FakeTraining, tmp_path: Path, capsys: Any
) -> None:
    from stages.register import main

    for kind in ("gan", "segmenter"):
        fake_training(kind, directory=tmp_path / "models" / kind)
    _write_metrics(tmp_path)
    args = [f"--{kind}-model={tmp_path / 'models' / kind}" for kind in ("gan", "segmenter")]
    args += [f"--{kind}-metrics={tmp_path / 'metrics' / f'{kind}.json'}" for kind in ("gan", "segmenter")]
    args.append(f"--out={tmp_path / 'registry'}")
    assert main([f"--params={tiny_params()}", *args]) == 0
    assert "texture-segmenter: registered version 1 (champion)" in capsys.readouterr().out
    strict = tmp_path / "strict"
    strict.mkdir()
    assert main([f"--params={write_params(strict, {'register.segmenter.min_miou': 0.9})}", *args]) == 0
    out = capsys.readouterr().out
    seg = "texture-segmenter: already registered as version 1 (challenger): gate failed (miou 0.7 < min_miou 0.9)"
    assert seg in out, out
    assert "texture-gan: already registered as version 1 (champion): gate passed (" in out
    record = json.loads((tmp_path / "registry" / f"{SEG}.json").read_text())
    assert record["aliases"] == ["challenger"] and not record["gate_passed"]


def test_gan_gate_rejects_collapse_and_compares_fid_only_from_the_same_extractor(
    tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining
) -> None:
    first = registry.register_model(tiny_cfg, "gan", fake_training("gan", 0), gan_metrics(40.0, 0.2))
    assert first["aliases"] == ["champion"]
    one_per_class = gan_metrics(30.0, 0.01) | {"diversity": 0.02}
    collapsed = registry.register_model(tiny_cfg, "gan", fake_training("gan", 1), one_per_class)
    assert collapsed["aliases"] == ["challenger"] and "diversity 0.02 < min_diversity 0.5" in collapsed["reason"]
    worse = registry.register_model(tiny_cfg, "gan", fake_training("gan", 2), gan_metrics(45.0, 0.3))
    assert worse["aliases"] == ["challenger"] and "fid 45 >= champion v1's 40" in worse["reason"]
    other = registry.register_model(tiny_cfg, "gan", fake_training("gan", 3), gan_metrics(45.0, 0.3, EXTRACTOR_B))
    assert other["aliases"] == ["champion"] and "not comparable, comparison skipped" in other["reason"]
    assert champion_version(GAN) == "4"
    tags = mlflow.MlflowClient().get_model_version(GAN, "4").tags
    assert set(tags) == set(gate_mod.REQUIRED_METRICS["gan"]) | LINEAGE_TAGS and len(tags) <= 12
    assert (tags["fid"], tags["fid_ratio"], tags["recall"], tags["fid_features"]) == (
        "45.0",
        "0.15",
        "0.3",
        EXTRACTOR_B,
    )
    assert "max_fid_ratio 0.75" in tags[registry.TAG_GATE_REASON]  # the thresholds it was judged by


def test_promote_cli_gates_and_force_overrides(
    tiny_cfg: config.Config, tiny_params: Any, tracking_server: MlflowServer, fake_training: FakeTraining
) -> None:
    params = str(tiny_params())
    registry.register_model(tiny_cfg, "segmenter", fake_training("segmenter", 0), seg_metrics(0.7))
    registry.register_model(tiny_cfg, "segmenter", fake_training("segmenter", 1), seg_metrics(0.6))

    refused = cli("promote", SEG, "--version", "2", "--params", params)
    assert_one_line_error(refused, "texture-segmenter v2 not promoted to champion", "miou 0.6 <= champion v1's 0.7")
    assert champion_version(SEG) == "1"

    forced = cli("promote", SEG, "--version", "2", "--force", "--params", params)
    assert forced.returncode == 0, forced.stderr
    assert "skipped (--force)" in forced.stdout and "alias 'champion': v1 -> v2" in forced.stdout
    assert champion_version(SEG) == "2"
    assert "challenger" not in mlflow.MlflowClient().get_registered_model(SEG).aliases  # v2 was the challenger

    back = cli("promote", SEG, "--version", "1", "--params", params)
    assert back.returncode == 0, back.stderr
    assert "gate: pass: miou 0.7 >= min_miou 0.5" in back.stdout
    assert "champion: pass: miou 0.7 > champion v2's 0.6" in back.stdout
    assert champion_version(SEG) == "1"


def test_cli_errors_are_one_line(tiny_params: Any, tracking_server: MlflowServer, tmp_path: Path) -> None:
    params = str(tiny_params())
    assert_one_line_error(cli("promote", GAN, "--params", params), "registered model 'texture-gan' not found at")

    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    mlflow.MlflowClient().create_registered_model(SEG)
    missing_alias = cli("segment", str(image), "--model-uri", f"models:/{SEG}@nope", "--out", str(tmp_path / "o"))
    assert_one_line_error(missing_alias, "registered model 'texture-segmenter' has no alias 'nope'")

    closed = f"http://127.0.0.1:{free_port()}"
    env = child_env(MLFLOW_TRACKING_URI=closed, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    unreachable = cli("promote", SEG, "--params", params, env=env, timeout=60)
    assert_one_line_error(unreachable, f"MLflow tracking server {closed} is not reachable")


def test_register_reports_a_run_missing_from_the_store(
    tiny_cfg: config.Config, tracking_server: MlflowServer, fake_training: FakeTraining
) -> None:
    model_dir = fake_training("segmenter")
    (model_dir / "run.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": "sqlite:///elsewhere.db"}))
    with pytest.raises(UserError, match=r"run.json: training run 0{32} not found at http://.*sqlite:///elsewhere.db"):
        registry.register_model(tiny_cfg, "segmenter", model_dir, seg_metrics(0.7))


def _write_metrics(directory: Path) -> None:
    (directory / "metrics").mkdir()
    (directory / "metrics" / "gan.json").write_text(json.dumps(gan_metrics(40.0, 0.2)))
    (directory / "metrics" / "segmenter.json").write_text(json.dumps(seg_metrics(0.7)))


def _dvc(repo: Path, *args: str) -> str:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=repo,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("uncached", [True, False], ids=["cache-false", "cached"])
def test_register_stage_is_never_restored_from_the_run_cache(
    uncached: bool, tiny_params: Any, tracking_server: MlflowServer, fake_training: FakeTraining, tmp_path: Path
) -> None:
    """With ``cache: false`` a deleted registry record means a rerun (the duplicate guard keeps it idempotent);
    with a cached output DVC restores the record from its run-cache and the registration silently never happens."""
    repo = tmp_path / "repo"
    repo.mkdir()
    tiny_params(directory=repo)
    for kind in ("gan", "segmenter"):
        fake_training(kind, directory=repo / "models" / kind)
    _write_metrics(repo)
    out = "      - registry:\n          cache: false\n" if uncached else "      - registry\n"
    (repo / "dvc.yaml").write_text(
        "stages:\n  register:\n"
        f"    cmd: {sys.executable} {ROOT / 'stages' / 'register.py'} --params params.yaml --gan-model models/gan "
        "--segmenter-model models/segmenter --gan-metrics metrics/gan.json "
        "--segmenter-metrics metrics/segmenter.json --out registry\n"
        "    deps: [models/gan, models/segmenter, metrics/gan.json, metrics/segmenter.json]\n"
        "    params: [register, mlflow]\n"
        f"    outs:\n{out}"
    )
    _dvc(repo, "init", "--no-scm", "-q")

    first = _dvc(repo, "repro")
    assert "texture-segmenter: registered version 1 (champion)" in first
    record = json.loads((repo / "registry" / "texture-segmenter.json").read_text())
    assert record["version"] == "1" and record["created"] and record["aliases"] == ["champion"]
    if uncached:
        assert "didn't change, skipping" in _dvc(repo, "repro")  # still a no-op when nothing changed

    client = mlflow.MlflowClient()
    for name in (GAN, SEG):  # a fresh registry (new server, wiped store) and no records on disk
        client.delete_registered_model(name)
    for path in (repo / "registry").iterdir():
        path.unlink()
    (repo / "registry").rmdir()

    third = _dvc(repo, "repro")
    if uncached:
        assert "skipping run" not in third and "texture-segmenter: registered version 1 (champion)" in third
        assert champion_version(SEG) == "1" and champion_version(GAN) == "1"
    else:
        assert "Stage 'register' is cached - skipping run" in third
        assert (repo / "registry" / "texture-segmenter.json").is_file()  # the record claims a version...
        assert client.search_registered_models(filter_string=f"name = '{SEG}'") == []  # ...that does not exist
