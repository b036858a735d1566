"""torchrun entry point for tests/test_drills.py: notes its rank and attempt, then stops with a user error
(``user``) or crashes (``crash``)."""

import os
import sys

from pipeline.errors import UserError, main_entry


@main_entry("worker_exit")
def main(mode: str, log: str) -> None:
    with open(log, "a") as f:
        f.write(f"{os.environ['RANK']} {os.environ['TORCHELASTIC_RESTART_COUNT']}\n")
    if mode == "user":
        raise UserError(f"{log}: a mistake the user can fix")
    raise RuntimeError("a bug")


if __name__ == "__main__":
    main(*sys.argv[1:])
