"""NaN and Inf in the input (issue 15): found, refused by default, or replaced. Pure numpy.

Integer inputs cannot hold them and pass through untouched (no copy, no scan). For
float inputs two places look: the statistics sample (:func:`check_samples`, before any
work: statistics ignore non-finite values, :func:`finite_values`) and every raw read of
the block engine (:func:`finite_block`, one vectorised scan of the box), so a voxel the
sample missed is found too. The default refuses, naming the count and the fix;
``--nan-value V`` replaces every NaN, +Inf and -Inf by V before the model, so a finite
model never writes NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unetflow.errors import InputFormatError

FIX = "pass --nan-value V (e.g. --nan-value 0) to replace them before the model, or fix the input"


def finite_values(values: np.ndarray) -> np.ndarray:
    """*values* without NaN and Inf (the same array where it holds none or is not float).

    >>> finite_values(np.array([1.0, np.nan, np.inf, 2.0])).tolist()
    [1.0, 2.0]
    """
    if values.dtype.kind not in "fc":
        return values
    ok = np.isfinite(values)
    return values if ok.all() else values[ok]


def count_nonfinite(values: np.ndarray) -> int:
    """How many NaN, +Inf and -Inf *values* holds (0 for integer arrays).

    >>> count_nonfinite(np.array([np.nan, -np.inf, 0.5]))
    2
    """
    if values.dtype.kind not in "fc":
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def check_samples(samples: np.ndarray, *, nan_value: float | None, name: str) -> None:
    """Refuse a statistics sample (ndarray of shape (C, N)) holding NaN or Inf, unless
    *nan_value* is given.

    Raises
    ------
    InputFormatError
    """
    bad = count_nonfinite(samples)
    if bad and nan_value is None:
        what = f"all {bad}" if bad == samples.size else f"{bad} of the {samples.size}"
        raise InputFormatError(f"input {name} has NaN or Inf values: {what} sampled voxels; {FIX}")


def finite_block(raw: np.ndarray, *, nan_value: float | None, name: str, box: Any = None) -> np.ndarray:
    """A raw read box with NaN and Inf replaced by *nan_value*; the engine calls it on every
    raw read, before normalising. Returns *raw* itself when it holds none (or is not float).

    Raises
    ------
    InputFormatError
        *raw* holds NaN or Inf and *nan_value* is ``None``: names the count and the box.
    """
    if raw.dtype.kind != "f" or np.isfinite(raw).all():
        return raw
    if nan_value is None:
        where = f" in box offset {list(box.offset)} shape {list(box.shape)}" if box is not None else ""
        raise InputFormatError(f"input {name} has {count_nonfinite(raw)} NaN or Inf voxels{where}; {FIX}")
    return np.nan_to_num(raw, nan=nan_value, posinf=nan_value, neginf=nan_value)
