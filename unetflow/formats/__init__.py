"""Input and output formats beyond plain Zarr arrays: the microscopy ecosystem.

- :mod:`.tiff`: TIFF, BigTIFF, OME-TIFF, and a folder or glob of one TIFF per z-slice
- :mod:`.hdf5`: ``file.h5:/group/dataset``
- :mod:`.omezarr`: OME-Zarr (NGFF 0.4 and 0.5) images at a resolution level; OME-Zarr 0.5 outputs
- :mod:`.remote`: fsspec URLs (s3, gs, http) that zarr opens
- :mod:`.convert`: any input to Zarr v3 (or OME-Zarr), in parallel, bounded memory
- :mod:`.preview`: a PNG of one slice with the prediction over the input

:func:`open_image` is what :func:`unetflow.store.open_input` calls for every path
that is not a local Zarr array; it returns a lazily sliceable array (a
``zarr.Array`` or a :class:`~.base.ImageArray`). Format libraries are imported on use.
"""

from __future__ import annotations

from typing import Any, Sequence

from unetflow.errors import InputFormatError


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

