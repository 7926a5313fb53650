"""Input and output formats beyond plain Zarr arrays: the microscopy ecosystem.

- :mod:`.tiff`: TIFF, BigTIFF, OME-TIFF, and a folder or glob of one TIFF per z-slice
- :mod:`.hdf5`: ``file.h5:/group/dataset``
- :mod:`.omezarr`: OME-Zarr (NGFF 0.4 and 0.5) images at a resolution level; OME-Zarr 0.5 outputs
- :mod:`.remote`: fsspec URLs (s3, gs, http) that zarr opens
- :mod:`.convert`: any input to Zarr v3 (or OME-Zarr), in parallel, bounded memory
- :mod:`.preview`: a PNG of one slice with the prediction over the input

:func:`open_input` opens any input path read-only: a local Zarr array or OME-Zarr
level itself, anything else through :func:`open_image`; it returns a lazily sliceable
array (a ``zarr.Array`` or a :class:`~.base.ImageArray`). Format libraries are
imported on use. This room sits above :mod:`unetflow.store` (Zarr arrays: create,
read boxes, write boxes), which never imports it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from unetflow import store
from unetflow.errors import InputFormatError, InputNotFoundError


def open_input(path: str | os.PathLike[str], *, level: int | None = None) -> store.ImageArray:
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
    import zarr
    import zarr.errors

    from unetflow.formats import omezarr

    if is_special(path):
        return open_image(path, level=level)
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


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Shape, dtype, chunks, shards, codecs, dimension names and attributes of an input."""
    return store.describe(open_input(path), path)


def is_special(path: str | Sequence[str]) -> bool:
    """Whether *path* needs a format adapter (anything but a local Zarr store)."""
    if not isinstance(path, str):
        return True
    from unetflow.formats import hdf5, remote, tiff

    return remote.is_url(path) or tiff.is_tiff(path) or hdf5.is_hdf5(path) or tiff.slice_files(path) is not None


def open_image(path: str | Sequence[str], *, level: int | None = None) -> Any:
    """Open any supported non-Zarr input (or remote Zarr) lazily.

    Raises
    ------
    InputNotFoundError, InputFormatError
    """
    from unetflow.formats import hdf5, omezarr, remote, tiff

    if not isinstance(path, str) or tiff.slice_files(path) is not None:
        _no_level(path, level)
        return tiff.open_slices(path)
    if remote.is_url(path):
        return omezarr.open_zarr_node(path, level=level)
    if tiff.is_tiff(path):
        return tiff.open_tiff(path, level=level)
    if hdf5.is_hdf5(path):
        _no_level(path, level)
        return hdf5.open_hdf5(path)
    raise InputFormatError(f"input {path} is not a format unetflow reads; use Zarr, OME-Zarr, TIFF or file.h5:/dataset")


def _no_level(path: Any, level: int | None) -> None:
    if level not in (None, 0):
        raise InputFormatError(f"input {path} has one resolution level, not level {level}; leave out --level")

