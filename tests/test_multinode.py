"""Two "nodes" x one process on localhost, joined by torchrun's c10d rendezvous through our launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous(tiny_params, tmp_path: Path) -> None:
    params = tiny_params()
    port = _free_port()
    procs = []
    for node in range(2):
        rdzv = f"--nnodes 2 --node-rank {node} --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} --rdzv-id t{port}"
        env = os.environ | {"PIPELINE_TORCHRUN_ARGS": rdzv, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pipeline.launch", "--nproc", "1"]
        cmd += [str(ROOT / "tests/scripts/collectives.py"), str(params), str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in results] == [2, 2]
    assert results[0]["gathered"] == results[1]["gathered"] == [0.0, 10.0, 11.0]
