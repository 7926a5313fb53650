"""Every touch of Zarr: open inputs, read mirrored boxes, create outputs, write boxes.

Arrays are channel-first: an input is (Y, X), (C, Y, X), (Z, Y, X) or (C, Z, Y, X).
Whether a leading axis is a channel axis is decided from the Zarr
``dimension_names`` when present (a name ``c`` or ``channel``), otherwise from the
model's spatial dims: ``ndim == dims`` means no channel axis, ``ndim == dims + 1``
a leading channel axis.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import zarr
import zarr.codecs
import zarr.errors

from unetflow import resume
from unetflow.errors import ConfigError, InputFormatError, OutputExistsError, OutputWriteError, ShapeError
from unetflow.geometry import Box, Shape, mirror_indices

log = logging.getLogger(__name__)

CHANNEL_NAMES = ("c", "ch", "channel", "channels")


class ImageArray(Protocol):
    """What a run reads from: a Zarr array, or a :mod:`unetflow.formats` reader (TIFF,
    HDF5, an OME-Zarr level), sliced lazily with numpy indexing."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    @property
    def chunks(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any) -> Any: ...


@dataclass(frozen=True)
class Layout:
    """How an input array's axes map onto (C, *spatial)."""

    has_channel: bool
    channels: int
    spatial_shape: Shape

    @property
    def spatial_ndim(self) -> int:
        return len(self.spatial_shape)


def layout_for(array: ImageArray, dims: int, *, name: str) -> Layout:
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


def _dimension_names(array: ImageArray) -> tuple[str | None, ...] | None:
    names = getattr(array, "dimension_names", None) or getattr(getattr(array, "metadata", None), "dimension_names", None)
    return tuple(names) if names else None


def read_box(array: ImageArray | np.ndarray, box: Box, *, layout: Layout, mode: str = "reflect", name: str = "") -> np.ndarray:
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
    return data[np.ix_(np.arange(data.shape[0]), *[i - a for i, a in zip(index, lo)])]


def sample_voxels(array: ImageArray, *, layout: Layout, max_chunks: int = 64, max_voxels: int = 2**22) -> np.ndarray:
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


# ---- what --overwrite may remove (issue 15) ------------------------------------------
#
# ``--overwrite`` removes an existing path only if unetflow wrote it, as the kind of
# thing the command writes, or if it is an empty folder. How each kind is recognised:
#
#   segment  the run folder holds the run's identity (resume.is_unetflow_output) and
#            the store's array (or its level 0) holds the run's ``unetflow.config``
#   convert  the array's attributes (or those of level 0 of an OME-Zarr group) hold
#            ``unetflow.converted_from``
#   sample   ``raw`` and ``labels`` arrays whose attributes hold ``unetflow.sample``
#   scratch  the instances scratch array: attributes hold ``unetflow.scratch_of``
#
# Checkpoints (model init, train) are recognised in unetflow.model.checkpoint.

WRITERS = {
    "segment": "outputs of unetflow segment",
    "convert": "stores written by unetflow convert",
    "sample": "samples written by unetflow sample",
    "scratch": "instance scratch arrays of unetflow segment",
}


def _zarr_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``unetflow`` attributes in a Zarr v3 node's ``zarr.json`` ({} if none)."""
    try:
        meta = json.loads(Path(path, "zarr.json").read_text())
    except (OSError, ValueError):
        return {}
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    own = attrs.get("unetflow") if isinstance(attrs, dict) else None
    return own if isinstance(own, dict) else {}


def written_by(path: str | os.PathLike[str]) -> str:
    """What unetflow wrote at *path*: ``empty`` (an empty folder), a key of :data:`WRITERS`,
    or ``""`` (nothing there, or something unetflow did not write)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return ""
    if not os.listdir(path):
        return "empty"
    own = _zarr_attrs(path)
    if resume.is_unetflow_output(path) and any("config" in _zarr_attrs(p) for p in _level0_candidates(path)):
        return "segment"
    if "converted_from" in own or "converted_from" in _zarr_attrs(Path(path, "0")):
        return "convert"
    if "scratch_of" in own:
        return "scratch"
    if all("sample" in _zarr_attrs(Path(path, name)) for name in ("raw", "labels")):
        return "sample"
    return ""


def _level0_candidates(path: str | os.PathLike[str]) -> list[Path]:
    """Where a segment output's array (with the run's attributes) may be: the store
    itself, or level 0 of an OME-Zarr image or label image inside it."""
    root = Path(path)
    return [root, root / "0", *sorted(root.glob("labels/*/0"))]


def describe_found(path: str | os.PathLike[str]) -> str:
    """What lies at an existing *path*, in a few words, for a refusal.

    >>> describe_found("/")[:8]
    'a folder'
    """
    if os.path.islink(path):
        return f"a symbolic link to {os.readlink(path)}"
    if not os.path.isdir(path):
        return f"a file of {os.path.getsize(path)} bytes"
    kind = written_by(path)
    if kind in WRITERS:
        return "one of the " + WRITERS[kind]
    names = sorted(os.listdir(path))
    if "zarr.json" in names or ".zarray" in names or ".zgroup" in names:
        return "a Zarr store that unetflow did not write"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"a folder of {len(names)} {'entry' if len(names) == 1 else 'entries'} ({shown}) that unetflow did not write"


def check_output_free(path: str | os.PathLike[str], *, overwrite: bool, kinds: Sequence[str] = ("segment",), what: str = "output") -> None:
    """Refuse an existing *path* unless *overwrite* and unetflow wrote it as one of
    *kinds* (see :data:`WRITERS`), or it is an empty folder. Never deletes anything.

    Raises
    ------
    OutputExistsError
        *path* exists, and either *overwrite* is off or *path* is not removable.
    """
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise OutputExistsError(f"{what} {path} already exists; pass --overwrite to replace it or choose another path")
    kind = written_by(path)
    if kind == "empty" or kind in kinds:
        return
    allowed = " or ".join(WRITERS[k] for k in kinds)
    raise OutputExistsError(
        f"{what} {path} exists and is {describe_found(path)}; --overwrite removes only {allowed} or an empty folder, "
        "never anything else: choose another path, or remove it yourself"
    )


def clear_output(path: str | os.PathLike[str], *, overwrite: bool, kinds: Sequence[str] = ("segment",), what: str = "output") -> None:
    """Remove an existing *path* that :func:`check_output_free` allows to remove; refuse
    anything else. (A segment output's run folder is cleared by the run that replaces it.)"""
    check_output_free(path, overwrite=overwrite, kinds=kinds, what=what)
    if not os.path.lexists(path):
        return
    log.info("removing existing %s %s (--overwrite)", what, path)
    try:
        shutil.rmtree(path)
    except OSError as err:
        raise OutputWriteError(f"{what} {path} cannot be removed ({_os_reason(err)}); make its location writable or choose another path") from None


# ---- where paths live: the output may not overlap an input ---------------------------

_H5_FILE = re.compile(r"^(.+?\.(?:h5|hdf5|hdf|he5)):", re.IGNORECASE)


def location(path: str) -> str:
    """Where *path* lives on disk (resolved, symlinks followed) or, for a URL, the URL
    normalised: what two paths are compared by. ``file.h5:/dataset`` is the file, a glob
    the folder it expands in, ``file://`` a local path.

    >>> location("s3://Bucket/raw.zarr/")
    's3://Bucket/raw.zarr'
    """
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme.lower()}://{rest.rstrip('/')}"
    match = _H5_FILE.match(path)
    if match:
        path = match.group(1)
    if any(ch in path for ch in "*?["):
        path = os.path.dirname(re.split(r"[*?\[]", path, maxsplit=1)[0]) or "."
    return os.path.realpath(path)


def _inside(a: str, b: str) -> bool:
    """Whether location *a* is *b* or lies inside it."""
    return a == b or a.startswith(b.rstrip("/") + "/")


def check_apart(output: str, others: Sequence[tuple[str, str | None]], *, what: str = "output") -> None:
    """Refuse an *output* that is one of *others* (``[("input", path), ("model", path)]``),
    lies inside one, or contains one: writing it (or ``--overwrite``) would destroy them.

    Raises
    ------
    ConfigError
    """
    out = location(output)
    for name, other in others:
        if not other:
            continue
        where = location(other)
        relation = "is" if out == where else "lies inside" if _inside(out, where) else "contains" if _inside(where, out) else ""
        if relation:
            raise ConfigError(
                f"{what} {output} {relation} the {name} {other} ({out}); writing it would destroy the {name}: "
                f"choose a path for the {what} outside {other}"
            )


# ---- can the output be written, and does it fit --------------------------------------


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(path: str, *, what: str = "output") -> None:
    """Refuse an output whose location (the nearest existing folder) cannot be written.

    Raises
    ------
    OutputWriteError
    """
    if "://" in path and not path.startswith("file://"):
        return  # remote stores: found when the output is created
    where = _existing_ancestor(path)
    if not os.path.isdir(where):
        raise OutputWriteError(f"{what} {path} cannot be created: {where} is a file, not a folder; choose another path")
    if not os.access(where, os.W_OK | os.X_OK):
        import errno

        reason = "read-only file system" if _read_only(where) else "no write permission"
        raise OutputWriteError(f"{what} {path} cannot be written: {where} has {reason} (errno {errno.EROFS if _read_only(where) else errno.EACCES}); choose a writable location")


def _read_only(where: str) -> bool:
    try:
        return bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def free_bytes(path: str) -> int | None:
    """Free space where *path* is (or would be) created; ``None`` for URLs or unknown."""
    if "://" in path and not path.startswith("file://"):
        return None
    try:
        return int(shutil.disk_usage(_existing_ancestor(path)).free)
    except OSError:
        return None


def _os_reason(err: OSError) -> str:
    """``[Errno 28] No space left on device`` as one short phrase."""
    return f"{err.strerror or type(err).__name__} (errno {err.errno})" if err.errno else f"{type(err).__name__}: {err}"


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
    kinds: Sequence[str] = ("segment",),
) -> zarr.Array:
    """Create the Zarr v3 output array (zstd-compressed, optionally sharded).

    An existing *path* is removed first only with *overwrite* and only if unetflow
    wrote it as one of *kinds* (:func:`clear_output`).

    Raises
    ------
    OutputExistsError
        *path* exists and may not be removed.
    OutputWriteError
        The location cannot be written (read-only, full, permissions).
    """
    clear_output(path, overwrite=overwrite, kinds=kinds)
    try:
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
    except OSError as err:
        raise OutputWriteError(f"output {path} cannot be created ({_os_reason(err)}); free space or choose a writable location") from None


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


def describe(array: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Shape, dtype, chunks, shards, codecs, dimension names and attributes of an opened
    array (see :func:`unetflow.formats.describe`)."""
    if not isinstance(array, zarr.Array):
        return array.describe()
    meta = array.metadata
    info: dict[str, Any] = {
        "path": str(path),
        "zarr_format": meta.zarr_format,
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "chunks": list(array.chunks),
        "shards": list(shards) if (shards := getattr(array, "shards", None)) else None,
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
