"""User-facing errors: one clear line, no traceback."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

MESSAGE_LIMIT = 300  # characters of an exception's message quoted in a one-line error
# How ``pipeline.launch`` (the torchrun agent) hears of a user error in one of its workers: the worker writes
# its line into ERROR_DIR and sends REPORT_SIGNAL to LAUNCHER_PID, which stops the job without a restart.
LAUNCHER_PID, ERROR_DIR, REPORT_SIGNAL = "PIPELINE_LAUNCHER_PID", "PIPELINE_ERROR_DIR", signal.SIGUSR1


class UserError(Exception):
    """A mistake the user can fix (bad params, missing file, unknown model): printed as one line."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message for quoting in a one-line error, or its type name when it has none.

    Runs of whitespace (newlines included) become one space; at most ``MESSAGE_LIMIT`` characters.
    """
    text = " ".join(str(exc).split())
    if len(text) > MESSAGE_LIMIT:
        text = text[: MESSAGE_LIMIT - 3] + "..."
    return text or type(exc).__name__


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn :class:`UserError` into ``prog: error: message`` on stderr and exit status 2."""
    try:
        yield
    except UserError as exc:
        line = f"{prog}: error: {exc}"
        if not _report_to_launcher(line):
            print(line, file=sys.stderr)
        raise SystemExit(2) from None


def _report_to_launcher(line: str) -> bool:
    """Hand ``line`` to ``pipeline.launch`` when it started this process (a torchrun worker); False otherwise.

    The launcher prints each distinct line once, after the job stopped, instead of every rank and restart.
    """
    launcher, directory = os.environ.get(LAUNCHER_PID), os.environ.get(ERROR_DIR)
    if not launcher or not directory or os.getppid() != int(launcher):
        return False
    (Path(directory) / f"rank-{os.environ.get('RANK', '0')}").write_text(line + "\n")
    os.kill(int(launcher), REPORT_SIGNAL)
    return True


def main_entry(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for stage/CLI ``main`` functions: user errors exit 2 with one line."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with user_errors(prog):
                return fn(*args, **kwargs)

        return inner

    return wrap
