"""``python -m pipeline.launch [--nproc N|auto] [--max-restarts K] SCRIPT [ARGS...]``: torchrun with our defaults.

``auto`` means every local GPU on CUDA and a small CPU count (2) otherwise, which torchrun's own
``auto`` (one process per CPU core) does not give. Single node runs use ``--standalone`` (a free
rendezvous port); for several nodes put the rendezvous options in ``PIPELINE_TORCHRUN_ARGS``, e.g.
``--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id job42``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

CPU_PROCS = 2


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


def torchrun_argv(nproc: int, max_restarts: int, script: str, script_args: list[str]) -> list[str]:
    extra = shlex.split(os.environ.get("PIPELINE_TORCHRUN_ARGS", ""))
    rendezvous = extra if extra else ["--standalone"]
    return [
        sys.executable, "-m", "torch.distributed.run",
        *rendezvous,
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        script, *script_args,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", default="auto", help="processes per node: auto or N (default: auto)")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a worker failure")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    argv_out = torchrun_argv(resolve_nproc(ns.nproc), ns.max_restarts, ns.script, ns.args)
    # torchrun's shared rendezvous store hands restarted workers the dead workers' gloo addresses
    # (pytorch#135712): restarts then fail or hang. A fresh store per restart avoids it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    sys.stdout.flush()
    os.execv(sys.executable, argv_out)


if __name__ == "__main__":
    main()
