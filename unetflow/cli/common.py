"""What every command shares: logging set-up, one-line errors, shape arguments.

Command modules import this, never the package that registers them.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

import click

from unetflow.errors import UnetflowError, one_line

log = logging.getLogger("unetflow")


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("unetflow")
    root.handlers[:] = [handler]
    root.setLevel(level)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UnetflowError into ``error: <one line>`` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UnetflowError as err:
            click.echo(f"error: {one_line(str(err))}", err=True)
            sys.exit(1)

    return wrapper


def parse_shape_arg(value: str | None, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    from unetflow.config import parse_shape

    return parse_shape(value, what=what)
