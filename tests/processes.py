"""Stage processes for tests: started in their own session, stderr to a log, killed whole on exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def started(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``cmd`` in its own session (process group = its pid), stderr to ``log``; whatever is left of it is killed
    on exit (a hung torchrun must not leave workers behind)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=stderr, env=env, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run(cmd: list[str], log: Path, timeout: float = 240) -> tuple[int, str]:
    """(exit status, stderr) of the command run to the end."""
    with started(cmd, log) as proc:
        proc.wait(timeout=timeout)
    return proc.returncode, log.read_text()
