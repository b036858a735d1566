"""User-facing errors: one clear line, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

MESSAGE_LIMIT = 300  # characters of an exception's message quoted in a one-line error


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
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main_entry(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for stage/CLI ``main`` functions: user errors exit 2 with one line."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with user_errors(prog):
                return fn(*args, **kwargs)

        return inner

    return wrap
