"""Every touch of Zarr: open inputs, read mirrored boxes, create outputs, write boxes.

Arrays are channel-first: an input is (Y, X), (C, Y, X), (Z, Y, X) or (C, Z, Y, X).
Whether a leading axis is a channel axis is decided from the Zarr
``dimension_names`` when present (a name ``c`` or ``channel``), otherwise from the
model's spatial dims: ``ndim == dims`` means no channel axis, ``ndim == dims + 1``
a leading channel axis.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr
import zarr.errors

from unetflow.errors import InputFormatError, InputNotFoundError, OutputExistsError, ShapeError
from unetflow.geometry import Box, Shape, mirror_indices

log = logging.getLogger(__name__)

CHANNEL_NAMES = ("c", "ch", "channel", "channels")


def open_input(path: str | os.PathLike[str], *, level: int | None = None) -> Any:
    """Open an input read-only: a Zarr (v2 or v3) array, by path or ``store.zarr/group/array``.

    Other formats go through :mod:`unetflow.formats` and come back as lazily sliceable
    arrays with ``shape``, ``dtype``, ``chunks`` and ``dimension_names``: OME-Zarr
    images at resolution *level*, TIFF / BigTIFF / OME-TIFF, a folder or glob of TIFF
    slices, ``file.h5:/dataset`` and fsspec URLs (``s3://...``).

    Raises
    ------
    InputNotFoundError
        Nothing exists at *path*.
    InputFormatError
        *path* is a Zarr group, or not Zarr at all.
    """
    path = str(path)
    from unetflow import formats
    from unetflow.formats import omezarr

    if formats.is_special(path):
        return formats.open_image(path, level=level)
    if not os.path.exists(path):
        raise InputNotFoundError(f"input {path} does not exist; check the path (a Zarr array, or store.zarr/group/array)")
    try:
        node = zarr.open(store=path, mode="r")
    except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError, KeyError) as err:
        raise InputFormatError(
            f"input {path} is not a Zarr array ({type(err).__name__}); convert it to Zarr first or name the array inside the store"
        ) from None
    if isinstance(node, zarr.Group) and omezarr.is_ome(node):
        return omezarr.open_level(path, level=level)
    if level not in (None, 0):
        raise InputFormatError(f"input {path} is one Zarr array, not a multiscale image; leave out --level {level}")
    if isinstance(node, zarr.Group):
        names = sorted(name for name, _ in node.arrays())[:5]
        hint = f"; it holds arrays {names}, name one as {path}/{names[0]}" if names else "; name an array inside it"
        raise InputFormatError(f"input {path} is a Zarr group, not an array{hint}")
    return node


@dataclass(frozen=True)
class Layout:
    """How an input array's axes map onto (C, *spatial)."""

    has_channel: bool
    channels: int
    spatial_shape: Shape

    @property
    def spatial_ndim(self) -> int:
        return len(self.spatial_shape)


def layout_for(array: zarr.Array, dims: int, *, name: str) -> Layout:
    """The channel/spatial layout of *array* for a model of *dims* spatial axes.

    Raises
    ------
    ShapeError
        The array has a number of axes the model cannot take.
    """
    shape = tuple(int(s) for s in array.shape)
    names = _dimension_names(array)
    if names and names[0] and names[0].lower() in CHANNEL_NAMES and len(shape) == dims + 1:
        return Layout(True, shape[0], shape[1:])
    if len(shape) == dims:
        return Layout(False, 1, shape)
    if len(shape) == dims + 1:
        return Layout(True, shape[0], shape[1:])
    want = "(Y, X) or (C, Y, X)" if dims == 2 else "(Z, Y, X) or (C, Z, Y, X)"
    raise ShapeError(
        f"input {name} has {len(shape)} axes {shape} but the model is {dims}-D and takes {want}; "
        f"use a {len(shape) - (len(shape) > dims)}-D model or name a {dims}-D array"
    )


def _dimension_names(array: zarr.Array) -> tuple[str | None, ...] | None:
    names = getattr(array, "dimension_names", None) or getattr(getattr(array, "metadata", None), "dimension_names", None)
    return tuple(names) if names else None


def read_box(array: zarr.Array, box: Box, *, layout: Layout, mode: str = "reflect", name: str = "") -> np.ndarray:
    """Read *box* (spatial, may reach outside the image) as ndarray of shape (C, *box.shape).

    Voxels outside the image are mirrored (:func:`unetflow.geometry.mirror_indices`).
    Only the bounding range of the needed source voxels is read from the store.

    Raises
    ------
    InputFormatError
        A chunk in the box cannot be decoded (corrupt or truncated).
    """
    index = [np.asarray(mirror_indices(o, o + s, n, mode)) for o, s, n in zip(box.offset, box.shape, layout.spatial_shape)]
    lo = [int(i.min()) for i in index]
    hi = [int(i.max()) + 1 for i in index]
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    try:
        data = array[(slice(None),) + region] if layout.has_channel else array[region][None]
    except (RuntimeError, ValueError) as err:
        raise InputFormatError(
            f"input {name or getattr(array, 'store_path', '')} has a chunk that does not decode in box {list(zip(lo, hi))}: {err}; "
            "restore the chunk from a copy or re-write the input"
        ) from None
    data = np.asarray(data)
    if all(len(i) == b - a and (len(i) < 2 or i[1] > i[0]) for i, a, b in zip(index, lo, hi)):
        return data  # no voxel mirrored: the read is the box itself (a box wholly outside reads reversed)
    return data[np.ix_(range(data.shape[0]), *[i - a for i, a in zip(index, lo)])]


def sample_voxels(array: zarr.Array, *, layout: Layout, max_chunks: int = 64, max_voxels: int = 2**22) -> np.ndarray:
    """Values from at most *max_chunks* evenly spread chunks, ndarray of shape (C, N).

    Used for intensity statistics without reading the whole image. Each chunk is read
    whole (the unit of I/O) and thinned by a fixed stride so that N <= *max_voxels*
    per channel: memory stays a few chunks however large the chunks or the image are.
    Deterministic.
    """
    chunks = array.chunks[1:] if layout.has_channel else array.chunks
    grid = [math.ceil(n / c) for n, c in zip(layout.spatial_shape, chunks)]
    total = math.prod(grid)
    picks = sorted(set(np.linspace(0, total - 1, num=min(total, max_chunks)).round().astype(int).tolist()))
    stride = max(1, math.ceil(len(picks) * math.prod(chunks) / max_voxels))
    parts = []
    for flat in picks:
        pos = np.unravel_index(flat, grid)
        box = Box(tuple(int(p) * c for p, c in zip(pos, chunks)), tuple(chunks))
        box = box.intersect(Box((0,) * len(grid), layout.spatial_shape))
        parts.append(read_box(array, box, layout=layout).reshape(layout.channels, -1)[:, ::stride].copy())
    return np.concatenate(parts, axis=1)


def absolute_input(path: str) -> str:
    """*path* made absolute for workers in other directories; URLs stay as typed."""
    return path if "://" in path else os.path.abspath(path)


def check_output_free(path: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Refuse an existing output unless *overwrite*; never deletes anything itself."""
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"output {path} already exists; pass --overwrite to replace it or choose another path")


def create_output(
    path: str | os.PathLike[str],
    *,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: str,
    shards: Sequence[int] | None = None,
    dimension_names: Sequence[str] | None = None,
    attributes: dict[str, Any] | None = None,
    overwrite: bool = False,
    compression_level: int = 3,
) -> zarr.Array:
    """Create the Zarr v3 output array (zstd-compressed, optionally sharded)."""
    check_output_free(path, overwrite=overwrite)
    if overwrite and os.path.exists(path):
        log.info("removing existing output %s (--overwrite)", path)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return zarr.create_array(
        store=str(path),
        shape=tuple(int(s) for s in shape),
        chunks=tuple(int(c) for c in chunks),
        shards=tuple(int(s) for s in shards) if shards else None,
        dtype=dtype,
        compressors=zarr.codecs.ZstdCodec(level=compression_level),
        dimension_names=tuple(dimension_names) if dimension_names else None,
        attributes=attributes or {},
        fill_value=0,
        zarr_format=3,
    )


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a store this run made itself (a scratch array); missing is fine."""
    if os.path.isdir(path):
        shutil.rmtree(path)


def open_output(path: str | os.PathLike[str]) -> zarr.Array:
    """Open an existing output for writing blocks."""
    return zarr.open_array(store=str(path), mode="r+")


def write_box(array: zarr.Array, box: Box, data: np.ndarray, *, channel_axis: bool) -> None:
    """Write *data* (ndarray of shape (K, *box.shape) or box.shape) at spatial *box*."""
    index = ((slice(None),) if channel_axis else ()) + box.to_slices()
    array[index] = data


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Shape, dtype, chunks, shards, codecs, dimension names and attributes of an array."""
    array = open_input(path)
    if not isinstance(array, zarr.Array):
        return array.describe()
    meta = array.metadata
    info: dict[str, Any] = {
        "path": str(path),
        "zarr_format": meta.zarr_format,
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "chunks": list(array.chunks),
        "shards": list(array.shards) if getattr(array, "shards", None) else None,
        "dimension_names": list(_dimension_names(array) or []) or None,
        "nbytes": int(array.nbytes),
        "attributes": dict(array.attrs),
    }
    codecs = []
    for group in ("filters", "serializer", "compressors"):
        value = getattr(array, group, None)
        if value is None:
            continue
        for codec in value if isinstance(value, tuple) else (value,):
            codecs.append(repr(codec))
    info["codecs"] = codecs
    return info
