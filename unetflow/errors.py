"""The unetflow error tree.

Every error a user can cause is a :class:`UnetflowError`. Its message is one line
that names the thing, the value found and the fix, so the CLI can print it as is.
Classes also subclass the matching builtin, so callers may catch either.
"""

from __future__ import annotations


class UnetflowError(Exception):
    """Base of every error a user can cause; the CLI turns it into one line, exit 1."""


class InputNotFoundError(UnetflowError, FileNotFoundError):
    """A path the user named does not exist."""


class InputFormatError(UnetflowError, ValueError):
    """A path exists but is not what was expected (not a Zarr array, corrupt chunk...)."""


class ShapeError(UnetflowError, ValueError):
    """A shape (image, block, patch, channels) does not fit what the model or plan needs."""


class ConfigError(UnetflowError, ValueError):
    """A setting has a value that is not allowed."""


class CheckpointError(UnetflowError, ValueError):
    """A model file does not load or does not fit its spec."""


class OutputExistsError(UnetflowError, FileExistsError):
    """The output exists and --overwrite was not given."""


class OutputWriteError(UnetflowError, OSError):
    """The output's location cannot be written: read-only, full, or a store error."""


class BlockFailedError(UnetflowError, RuntimeError):
    """One or more blocks failed during a run."""


def one_line(text: str) -> str:
    """Collapse *text* to a single line (messages must stay one line).

    >>> one_line("a\\n  b")
    'a b'
    """
    return " ".join(str(text).split())


class LockedError(UnetflowError, RuntimeError):
    """Another run holds the output's lock (or a dead run left a stale one)."""
