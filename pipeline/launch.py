"""``python -m pipeline.launch [--nproc N|auto] [--max-restarts K] SCRIPT [ARGS...]``: torchrun with our defaults.

``auto`` means every local GPU on CUDA and a small CPU count (2) otherwise, which torchrun's own
``auto`` (one process per CPU core) does not give. Single node runs use ``--standalone`` (a free
rendezvous port); for several nodes put the rendezvous options in ``PIPELINE_TORCHRUN_ARGS``, e.g.
``--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id job42``.

User mistakes stop the job once, in one line, exit status 2: before torchrun starts, the script's
``--params`` file is validated, its global batch checked against the world size and its ``--checkpoints``
directory against the stage lock; a worker's user error (:mod:`pipeline.errors`) stops the job without a
restart and its line is printed here, once. The torchrun agent runs in this process, so its workers (which
die with their parent: :func:`pipeline.distributed.die_with_parent`) die with the launcher.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from pipeline import checkpoint, config
from pipeline.errors import ERROR_DIR, LAUNCHER_PID, REPORT_SIGNAL, user_errors

CPU_PROCS = 2
# The global batch each stage splits across ranks, as a params key.
GLOBAL_BATCH = {"train_gan": "gan.batch_size", "train_segmenter": "segmenter.batch_size"}


def resolve_nproc(value: str) -> int:
    """``auto`` -> local GPU count on CUDA, else :data:`CPU_PROCS`; an integer string as is."""
    if value != "auto":
        try:
            n = int(value)
        except ValueError:
            raise SystemExit(f"launch: error: --nproc: expected 'auto' or a positive integer, got {value!r}") from None
        if n < 1:
            raise SystemExit(f"launch: error: --nproc: expected a positive integer, got {n}")
        return n
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else CPU_PROCS


def _rendezvous_args() -> list[str]:
    extra = shlex.split(os.environ.get("PIPELINE_TORCHRUN_ARGS", ""))
    return extra if extra else ["--standalone"]


def torchrun_args(nproc: int, max_restarts: int, script: str, script_args: list[str]) -> list[str]:
    """The ``torchrun`` command line (without the program name)."""
    return [
        *_rendezvous_args(),
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        script, *script_args,
    ]  # fmt: skip


def world_size(nproc: int) -> int | None:
    """``nproc`` x the fixed node count of the rendezvous options, or None when elastic (``--nnodes 1:4``)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--nnodes", default="1")
    nnodes = parser.parse_known_args(_rendezvous_args())[0].nnodes
    return nproc * int(nnodes) if nnodes.isdigit() else None


def check_job(script: str, script_args: list[str], world: int | None) -> None:
    """The user mistakes visible before torchrun starts, as a :class:`~pipeline.errors.UserError`: a bad
    ``--params`` file, a global batch the world size does not divide, a locked ``--checkpoints`` directory
    (rank 0 takes the lock itself; this only fails fast)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--params")
    parser.add_argument("--checkpoints")
    ns = parser.parse_known_args(script_args)[0]
    if ns.params is not None:
        cfg = config.load(ns.params)
        key = GLOBAL_BATCH.get(Path(script).stem)
        if key is not None and world is not None:
            section, name = key.split(".")
            batch = getattr(getattr(cfg, section), name)
            if batch % world:
                raise config.ConfigError(f"{ns.params}: {key}: {batch} is not divisible by the world size {world}")
    if ns.checkpoints is not None:
        checkpoint.StageLock(ns.checkpoints).check_free()


class WorkerUserError(BaseException):
    """A worker reported a user error: the job stops (no restart). A BaseException, so that torchrun's
    ``except Exception`` clauses let it through to its clean-up (``finally``) and out to :func:`main`."""


def _on_report(signum: int, frame: FrameType | None) -> None:
    if not any(Path(os.environ[ERROR_DIR]).iterdir()):
        return  # not from a worker (e.g. a batch scheduler's warning signal)
    signal.signal(REPORT_SIGNAL, signal.SIG_IGN)  # the other ranks' reports are read after the shutdown
    logging.disable(logging.WARNING)  # torchrun's notes on stopping the workers are not the user's business
    raise WorkerUserError


def run_torchrun(args: list[str]) -> None:
    """torchrun's ``main`` in this process; a worker's user error is printed once and exits 2."""
    from torch.distributed.run import main as torchrun_main

    with tempfile.TemporaryDirectory(prefix="pipeline-launch-") as reports:
        os.environ[ERROR_DIR], os.environ[LAUNCHER_PID] = reports, str(os.getpid())
        signal.signal(REPORT_SIGNAL, _on_report)
        try:
            torchrun_main(args)
        except WorkerUserError:
            files = sorted(Path(reports).iterdir(), key=lambda p: int(p.name.rsplit("-", 1)[1]))
            for line in dict.fromkeys(p.read_text().strip() for p in files):
                print(line, file=sys.stderr)
            raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", default="auto", help="processes per node: auto or N (default: auto)")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a worker failure")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    nproc = resolve_nproc(ns.nproc)
    with user_errors(Path(ns.script).stem):
        check_job(ns.script, ns.args, world_size(nproc))
    # torchrun's shared rendezvous store hands restarted workers the dead workers' gloo addresses
    # (pytorch#135712): restarts then fail or hang. A fresh store per restart avoids it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    run_torchrun(torchrun_args(nproc, ns.max_restarts, ns.script, ns.args))


if __name__ == "__main__":
    main()
