"""A lazily opened, read-only image in unetflow's axis order, for any input format.

Every format adapter (TIFF, HDF5, OME-Zarr levels, remote Zarr) returns an
:class:`ImageArray`: an object with ``shape``, ``dtype``, ``chunks``,
``dimension_names``, ``voxel_size`` and basic-slicing ``__getitem__`` over axes
(C, Z, Y, X) or a subset of them, whatever order the file stores them in.

It is identified by the string the user typed (``path``) plus a ``level``: pickling
drops the open file handle, and a worker reopens it from those on first use, so
open TIFF and HDF5 handles never cross process boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from unetflow.errors import InputFormatError

# file axis letters (tifffile, NGFF, HDF5 conventions) -> unetflow axis names
AXIS_NAMES = {"c": "c", "s": "c", "z": "z", "q": "z", "i": "z", "y": "y", "x": "x", "t": "t"}
ORDER = ("c", "z", "y", "x")


@dataclass(frozen=True)
class AxisMap:
    """How the stored axes map onto (C, Z, Y, X): which to keep, in what order.

    ``source_axes`` are unetflow names of the stored axes (``t`` for time, dropped
    when singleton). ``keep[i]`` is the stored axis shown as output axis ``i``.
    """

    source_axes: tuple[str, ...]
    keep: tuple[int, ...]

    @classmethod
    def from_axes(cls, axes: Sequence[str], shape: Sequence[int], *, name: str) -> AxisMap:
        names = tuple(AXIS_NAMES.get(a.lower(), a.lower()) for a in axes)
        for axis, size in zip(names, shape):
            if axis not in ORDER and size != 1:
                raise InputFormatError(
                    f"input {name} has a {axis!r} axis of length {size} (axes {''.join(axes)}); unetflow takes one "
                    "time point of (C, Z, Y, X): select it into a new array with `unetflow convert` first"
                )
        if len(set(n for n in names if n in ORDER)) != len([n for n in names if n in ORDER]):
            raise InputFormatError(f"input {name} has repeated axes {''.join(axes)}; name each of c, z, y, x at most once")
        keep = tuple(names.index(a) for a in ORDER if a in names)
        return cls(names, keep)

    def dimension_names(self) -> tuple[str, ...]:
        return tuple(self.source_axes[i] for i in self.keep)

    def source_key(self, key: tuple[Any, ...]) -> tuple[Any, ...]:
        src: list[Any] = [0] * len(self.source_axes)
        for i, k in zip(self.keep, key):
            src[i] = k
        return tuple(src)

    def arrange(self, data: np.ndarray, key: tuple[Any, ...]) -> np.ndarray:
        """Stored-order *data* of a :meth:`source_key` read -> output order."""
        kept = [i for i, k in zip(self.keep, key) if isinstance(k, slice)]
        have = sorted(kept)
        order = [have.index(i) for i in kept]
        return data if order == sorted(order) else np.transpose(data, order)


class ImageArray:
    """A read-only image in (C, Z, Y, X) axis order (or a subset), opened lazily.

    Parameters
    ----------
    path : the string the user typed; its identity.
    opener : ``opener()`` -> (raw array with basic slicing, stored axes, extras dict).
        Extras may carry ``voxel_size`` and ``origin`` (spatial, Z/Y/X order), ``unit``, ``chunks``.
    level : resolution level (pyramidal inputs), part of the identity.
    """

    def __init__(self, path: str, opener: Callable[[], tuple[Any, Sequence[str], dict[str, Any]]], *, level: int | None = None, kind: str = ""):
        self.path = path
        self.level = level
        self.kind = kind
        self._opener = opener
        self._raw: Any = None
        raw, axes, extras = opener()
        self._set(raw, axes, extras)

    def _set(self, raw: Any, axes: Sequence[str], extras: dict[str, Any]) -> None:
        self._raw = raw
        self.axis_map = AxisMap.from_axes(axes, raw.shape, name=self.path)
        self.source_axes = "".join(axes)
        self.shape = tuple(int(raw.shape[i]) for i in self.axis_map.keep)
        self.dtype = np.dtype(raw.dtype)
        stored_chunks = extras.get("chunks") or getattr(raw, "chunks", None) or default_chunks(raw.shape)
        self.chunks = tuple(int(stored_chunks[i]) for i in self.axis_map.keep)
        self.dimension_names = self.axis_map.dimension_names()
        spatial = [n for n in self.dimension_names if n != "c"]
        voxel = extras.get("voxel_size") or {}
        self.voxel_size = tuple(float(voxel.get(a, 1.0)) for a in spatial)
        origin = extras.get("origin") or {}
        self.origin = tuple(float(origin.get(a, 0.0)) for a in spatial)  # where voxel 0 lies (OME-Zarr translation)
        self.unit = extras.get("unit")
        self.attrs = dict(extras.get("attrs") or {})

    # pickling: the open handle stays behind; a worker reopens from the path
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_raw"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def raw(self) -> Any:
        if self._raw is None:
            raw, axes, extras = self._opener()
            self._set(raw, axes, extras)
        return self._raw

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def store_path(self) -> str:
        return self.path

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _expand(key, self.ndim)
        raw_key = self.axis_map.source_key(key)
        data = np.asarray(self.raw[raw_key])
        return self.axis_map.arrange(data, key)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data.astype(dtype) if dtype is not None else data

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.kind,
            "level": self.level,
            "shape": list(self.shape),
            "dtype": str(self.dtype),
            "chunks": list(self.chunks),
            "stored_axes": self.source_axes,
            "dimension_names": list(self.dimension_names),
            "voxel_size": list(self.voxel_size),
            "origin": list(self.origin),
            "unit": self.unit,
            "nbytes": int(self.nbytes),
            "attributes": self.attrs,
        }

    def __repr__(self) -> str:
        return f"ImageArray({self.kind} {self.path!r}, level={self.level}, shape={self.shape}, dtype={self.dtype})"


def _expand(key: Any, ndim: int) -> tuple[Any, ...]:
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1 :]
    for k in key:
        if not isinstance(k, (slice, int, np.integer)):
            raise TypeError(f"ImageArray takes ints and slices only, got {type(k).__name__}")
    return tuple(key) + (slice(None),) * (ndim - len(key))


def default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """Chunks for contiguous data: whole planes of the last two axes, one at a time before."""
    n = len(shape)
    return tuple(int(s) if i >= n - 2 else 1 for i, s in enumerate(shape))
