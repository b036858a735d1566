"""DVC remote on S3: push the prepare stage's shards, wipe cache and outputs, pull them back intact."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.conftest import ROOT, write_params

if TYPE_CHECKING:
    from tests.team_stack import S3Server

pytest_plugins = ["tests.team_stack"]
pytestmark = pytest.mark.slow

DVC_TIMEOUT_S = 300


def _tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=DVC_TIMEOUT_S)
    assert res.returncode == 0, f"{' '.join(argv)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_push_wipe_pull_round_trip(s3_server: S3Server, tmp_path: Path) -> None:
    pytest.importorskip("dvc_s3", reason="dvc-s3 missing: pip install -e '.[team]'")
    from pipeline.data.shards import verify_shards

    bucket = s3_server.create_bucket("dvc-remote")
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "prepare.py", repo / "stages" / "prepare.py")
    write_params(repo)
    prepare = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare"]
    prepare["deps"] = ["stages/prepare.py"]  # the library is installed, not part of this scratch repo
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": prepare}}, sort_keys=False))

    # Credentials only in the environment: never in .dvc/config, which is committed.
    venv_bin = str(Path(sys.executable).parent)
    env = os.environ | s3_server.env | {"PATH": f"{venv_bin}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]

    def git(*args: str) -> str:
        return _run(["git", *args], repo, env)

    def run_dvc(*args: str) -> str:
        return _run([*dvc, *args], repo, env)

    git("init", "-q")
    run_dvc("init", "-q")
    run_dvc("remote", "add", "-d", "s3remote", f"s3://{bucket}/dvcstore")
    run_dvc("remote", "modify", "s3remote", "endpointurl", s3_server.endpoint)
    run_dvc("repro", "prepare")
    git("add", "-A")
    git("commit", "-q", "-m", "tiny shards")
    run_dvc("push")

    shards = repo / "data" / "shards"
    before = _tree_digest(shards)
    assert "manifest.json" in before and any(name.endswith(".tar") for name in before)
    stored = s3_server.keys(bucket, "dvcstore/")
    assert len(stored) >= len(before), stored  # one object per file, plus the directory listing
    assert s3_server.secret_key not in (repo / ".dvc" / "config").read_text()
    assert "Cache and remote 's3remote' are in sync" in run_dvc("status", "--cloud")

    shutil.rmtree(shards)
    shutil.rmtree(repo / ".dvc" / "cache")
    assert "not in cache" in run_dvc("status")

    run_dvc("pull")
    assert _tree_digest(shards) == before
    assert verify_shards(shards) == []
    assert "Data and pipelines are up to date" in run_dvc("status")
    assert "didn't change" in run_dvc("repro", "prepare")  # nothing to recompute after a pull
