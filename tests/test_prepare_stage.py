"""The ``prepare`` stage script, run as DVC runs it: a subprocess in a working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.shards import load_manifest, verify_shards
from tests.conftest import ROOT

SCRIPT = ROOT / "stages" / "prepare.py"


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_prepare_stage_writes_shards_with_default_paths(tmp_path: Path, tiny_params, tiny_shards: Path) -> None:
    tiny_params()
    result = _run(tmp_path, "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: 4 classes, patches/mosaics train ")
    shards = tmp_path / "data" / "shards"
    assert load_manifest(shards)["classes"] == ["stripes", "checker", "dots", "brick"]
    assert verify_shards(shards) == []
    # another process, same params: the same bytes (the manifest holds every shard's sha256)
    assert (shards / "manifest.json").read_bytes() == (tiny_shards / "manifest.json").read_bytes()


def test_prepare_stage_bad_param_exits_2_with_one_line(tmp_path: Path, tiny_params) -> None:
    params = tiny_params({"data.patch_size": 12})
    result = _run(tmp_path, "--params", str(params), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"prepare: error: {params}: data.patch_size: expected a positive multiple of 8, got 12"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("data.encoding", "jpeg", "data.encoding: expected one of 'png', 'raw', got 'jpeg'"),
        ("data.workers", -1, "data.workers: expected a number >= 0, got -1"),
    ],
)
def test_prepare_stage_bad_encoding_or_workers_exits_2_with_one_line(
    tmp_path: Path, tiny_params, key: str, value: object, expected: str
) -> None:
    params = tiny_params({key: value})
    result = _run(tmp_path, "--params", str(params), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"prepare: error: {params}: {expected}"]


def test_prepare_stage_in_two_processes_writes_the_same_bytes(tmp_path: Path, tiny_params, tiny_shards: Path) -> None:
    params = tiny_params({"data.workers": 2})
    result = _run(tmp_path, "--params", str(params), "--out", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(tiny_shards) for p in tiny_shards.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert all((tmp_path / "out" / f).read_bytes() == (tiny_shards / f).read_bytes() for f in files)
