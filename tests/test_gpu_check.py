"""benchmarks/gpu_check.sh: one line and exit 0 without a GPU; ``--cpu-smoke`` runs every measurement path (gloo,
tiny params) and reports every section with figures. No timing is asserted: only that the figures exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
NUMBER = re.compile(r"\d+(\.\d+)?")


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = os.environ | {"PY": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _tables(report: str) -> dict[str, list[list[str]]]:
    """Section heading -> the data rows of its table (cells stripped)."""
    tables: dict[str, list[list[str]]] = {}
    heading = None
    for line in report.splitlines():
        if line.startswith("### "):
            heading = line[4:]
            tables[heading] = []
        elif heading and line.startswith("| ") and not line.startswith("|---"):
            tables[heading].append([cell.strip() for cell in line.strip("|").split("|")])
    return {h: rows[1:] for h, rows in tables.items()}  # the first row is the header


def _gpu_check() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_bus_bandwidth_is_nccl_tests_definition() -> None:
    bus_bandwidth = _gpu_check().bus_bandwidth
    assert bus_bandwidth(1e9, 1.0, 2) == pytest.approx(1e9)  # 2 ranks: each byte crosses one link
    assert bus_bandwidth(1e9, 0.5, 8) == pytest.approx(2 * 7 / 8 * 2e9)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would measure it")
def test_without_a_gpu_one_line_and_exit_0() -> None:
    done = _run(timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no NVIDIA GPU"), done.stdout


@pytest.mark.slow
def test_cpu_smoke_reports_every_section_with_figures(tmp_path: Path) -> None:
    out, figures = tmp_path / "report.md", tmp_path / "figures.json"
    done = _run(
        "--cpu-smoke", "--out", str(out), "--json", str(figures), "--workdir", str(tmp_path / "work"), timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = done.stdout
    assert out.read_text() == report
    tables = _tables(report)
    expected = ("Devices", "All-reduce bus bandwidth", "Training steps/s", "torch.compile", "data_wait")
    for prefix in expected:
        rows = next((rows for heading, rows in tables.items() if heading.startswith(prefix)), None)
        assert rows, f"section {prefix!r} has no table rows:\n{report}"
        for row in rows:
            assert sum(bool(NUMBER.fullmatch(cell.split()[0])) for cell in row if cell) >= 2, row
    steps = next(rows for heading, rows in tables.items() if heading.startswith("Training steps/s"))
    assert [row[0] for row in steps] == ["gan", "segmenter"]
    assert [row[0] for row in tables[next(h for h in tables if h.startswith("torch.compile"))]] == ["false", "true"]
    waits = next(rows for heading, rows in tables.items() if heading.startswith("data_wait"))
    assert [row[0] for row in waits] == ["png", "raw"]
    for row in waits:
        assert 0.0 <= float(row[2].split()[0]) <= 1.0, row  # data_wait is a share of wall time
    assert "failed" not in report

    # A one-GPU machine has no all-reduce and no N-rank job: the same figures read that way.
    one_device = json.loads(figures.read_text()) | {"nproc": 1}
    del one_device["steps_n"]
    single = _tables(_gpu_check().markdown(one_device))
    assert "nothing to all-reduce" in _gpu_check().markdown(one_device)
    rows = next(rows for heading, rows in single.items() if heading.startswith("Training steps/s"))
    assert [row[3:6] for row in rows] == [["-", "-", "-"]] * 2
