"""Distributed helpers: world size 1 without torchrun, and 2 real gloo processes under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import config, distributed, launch
from tests.conftest import ROOT


def test_single_process_without_torchrun(tiny_cfg: config.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with distributed.distributed(tiny_cfg.train) as env:
        assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
        assert env.backend == "gloo" and env.device.type == "cpu"
        assert env.amp_dtype == distributed.resolve_precision(tiny_cfg.train.precision, env.device)
        t = torch.tensor([[1.0], [2.0]])
        assert torch.equal(distributed.all_gather_cat(t), t)
        assert distributed.all_reduce_mean({"a": 3.0}, env.device) == {"a": 3.0}
        assert distributed.any_rank(False, env.device) is False


def test_bf16_precision_can_be_forced_on_cpu(tiny_params) -> None:
    cfg = config.load(tiny_params({"train.precision": "bf16"}))
    env = distributed.init_distributed(cfg.train)
    assert env.amp_dtype == torch.bfloat16
    with env.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [({"avx512_bf16": True}, torch.bfloat16), ({"amx_bf16": True}, torch.bfloat16), ({"avx2": True}, None)],
)
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(
    capabilities: dict, expected: torch.dtype | None, tiny_params, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    cpu = {"train.device": "cpu"}
    auto = distributed.init_distributed(config.load(tiny_params(cpu | {"train.precision": "auto"})).train)
    assert auto.amp_dtype == expected
    fp32 = distributed.init_distributed(config.load(tiny_params(cpu | {"train.precision": "fp32"})).train)
    assert fp32.amp_dtype is None


def test_cuda_requested_without_gpu_is_a_user_error(tiny_params) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    cfg = config.load(tiny_params({"train.device": "cuda"}))
    with pytest.raises(distributed.UserError, match=r"train\.device: 'cuda'"):
        distributed.init_distributed(cfg.train)


def test_seeds_differ_per_rank_and_repeat() -> None:
    assert distributed.seed_everything(7, 0) != distributed.seed_everything(7, 1)
    distributed.seed_everything(7, 1)
    a = torch.rand(3)
    distributed.seed_everything(7, 1)
    assert torch.equal(a, torch.rand(3))


def test_launch_resolves_nproc_and_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    assert launch.resolve_nproc("3") == 3
    expected = torch.cuda.device_count() if torch.cuda.is_available() else launch.CPU_PROCS
    assert launch.resolve_nproc("auto") == expected
    with pytest.raises(SystemExit, match="--nproc"):
        launch.resolve_nproc("zero")
    monkeypatch.delenv("PIPELINE_TORCHRUN_ARGS", raising=False)
    argv = launch.torchrun_args(2, 1, "stages/x.py", ["--a"])
    assert "--standalone" in argv and "--nproc-per-node=2" in argv and argv[-2:] == ["stages/x.py", "--a"]
    assert launch.world_size(2) == 2
    monkeypatch.setenv("PIPELINE_TORCHRUN_ARGS", "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint head:29400")
    argv = launch.torchrun_args(4, 0, "s.py", [])
    assert "--standalone" not in argv and "--rdzv-endpoint" in argv and "--max-restarts=0" in argv
    assert launch.world_size(4) == 8
    monkeypatch.setenv("PIPELINE_TORCHRUN_ARGS", "--nnodes=1:4 --rdzv-backend c10d --rdzv-endpoint head:29400")
    assert launch.world_size(4) is None  # elastic: unknown until the rendezvous


@pytest.mark.slow
def test_collectives_over_two_gloo_processes(tiny_params, tmp_path: Path) -> None:
    params = tiny_params()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.launch", "--nproc", "2"]
    cmd += [str(ROOT / "tests/scripts/collectives.py"), str(params), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["world"] == 2 and r["backend"] == "gloo" and r["device"] == "cpu"
        assert r["gathered"] == [0.0, 10.0, 11.0]  # rank 0: 1 row, rank 1: 2 rows, in rank order
        assert r["sum"] == 3.0
        assert r["mean"] == {"x": 0.5, "y": 2.0}
        assert r["stop"] is True
        assert r["obj"] == {"from": 0}
        assert r["bn"] == [[0.5, 0.5], [2.0, 2.0], 0]  # running statistics averaged, the step count untouched
    assert r0["seed"] != r1["seed"]


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
# A child in its own session (as torchrun starts its workers, out of reach of a kill of the parent's group)
# that dies with its parent; it prints its pid.
PARENT = """
import os, subprocess, sys, time
child = "from pipeline import distributed; import os, time; distributed.die_with_parent(%d); "
child += "print(os.getpid(), flush=True); time.sleep(600)"
subprocess.Popen([sys.executable, "-c", child % os.getpid()], start_new_session=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@LINUX_ONLY
def test_a_process_dies_with_its_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, cwd=ROOT)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _running(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while _running(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


@LINUX_ONLY
def test_a_process_whose_parent_is_already_gone_dies_at_once() -> None:
    child = "from pipeline import distributed; distributed.die_with_parent(1); import time; time.sleep(600)"
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL  # our parent is not pid 1: as if it had died before the call
