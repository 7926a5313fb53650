"""TIFF, BigTIFF, OME-TIFF and one-TIFF-per-z-slice inputs, read lazily through tifffile's Zarr interface.

Nothing reads the whole file: tifffile exposes the pages (and tiles) as Zarr chunks,
and only the chunks a box touches are decoded. A folder or glob of TIFFs becomes
one (Z, Y, X) image with one chunk per file.
"""

from __future__ import annotations

import glob
import os
import xml.etree.ElementTree as ET
from typing import Any, Sequence

import tifffile
import zarr

from unetflow.errors import InputFormatError, InputNotFoundError
from unetflow.formats.base import ImageArray

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
OME_UNITS = {"µm": "micrometer", "um": "micrometer", "nm": "nanometer", "mm": "millimeter", "Å": "angstrom", "m": "meter"}


def is_tiff(path: str) -> bool:
    return path.lower().endswith(TIFF_SUFFIXES)


def slice_files(path: str | Sequence[str]) -> list[str] | None:
    """The sorted TIFF files of a glob, a folder of TIFFs or a list; ``None`` if *path* is none of these."""
    if not isinstance(path, str):
        return sorted(str(p) for p in path)
    if any(ch in path for ch in "*?["):
        return sorted(glob.glob(path))
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "zarr.json")) and not os.path.exists(os.path.join(path, ".zarray")):
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if is_tiff(f))
        return files or None
    return None


def open_tiff(path: str, *, level: int | None = None) -> ImageArray:
    """One TIFF file (BigTIFF and OME-TIFF included), series 0 at resolution *level*."""
    if not os.path.exists(path):
        raise InputNotFoundError(f"input {path} does not exist; check the path to the TIFF file")
    return ImageArray(path, lambda: _tiff_opener(path, level or 0), level=level, kind="tiff")


def _tiff_opener(path: str, level: int) -> tuple[Any, str, dict[str, Any]]:
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            if level >= len(series.levels):
                raise InputFormatError(f"input {path} has {len(series.levels)} resolution level(s), no level {level}; pass --level 0..{len(series.levels) - 1}")
            axes = series.levels[level].axes
            extras = _ome_voxel_size(tf.ome_metadata) if tf.is_ome else _imagej_voxel_size(tf)
    except tifffile.TiffFileError as err:
        raise InputFormatError(f"input {path} is not a readable TIFF ({err}); check the file or convert it") from None
    store = tifffile.imread(path, aszarr=True, series=0, level=level)
    return zarr.open_array(store, mode="r"), axes, extras


def open_slices(path: str | Sequence[str]) -> ImageArray:
    """A glob, folder or list of 2-D TIFFs, one per z-slice, sorted by name, as (Z, Y, X)."""
    files = slice_files(path)
    name = path if isinstance(path, str) else f"{len(files or [])} TIFF files"
    if not files:
        raise InputNotFoundError(f"input {name} matches no TIFF files; check the glob or folder (quote the glob)")
    return ImageArray(name, lambda: _slices_opener(files), kind="tiff-slices")


def _slices_opener(files: list[str]) -> tuple[Any, str, dict[str, Any]]:
    seq = tifffile.TiffSequence(files, pattern=None)
    store = seq.aszarr()
    array = zarr.open_array(store, mode="r")
    with tifffile.TiffFile(files[0]) as tf:
        page_axes = tf.series[0].axes
    axes = "Z" + page_axes
    if len(axes) != array.ndim:
        raise InputFormatError(f"TIFF slices {files[0]}.. have axes {page_axes}; each file must hold one 2-D (Y, X) or (Y, X, S) plane")
    return array, axes, {}


def _ome_voxel_size(xml: str | None) -> dict[str, Any]:
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return {}
    voxel = {a: float(pixels.get(f"PhysicalSize{a.upper()}")) for a in "zyx" if pixels.get(f"PhysicalSize{a.upper()}")}
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    return {"voxel_size": voxel, "unit": OME_UNITS.get(unit, unit)} if voxel else {}


def _imagej_voxel_size(tf: tifffile.TiffFile) -> dict[str, Any]:
    ij = tf.imagej_metadata or {}
    voxel = {}
    page = tf.pages.first
    res = page.tags.get("XResolution")
    if res and res.value[0]:
        voxel["x"] = res.value[1] / res.value[0]
        yres = page.tags.get("YResolution")
        voxel["y"] = yres.value[1] / yres.value[0] if yres and yres.value[0] else voxel["x"]
    if "spacing" in ij:
        voxel["z"] = float(ij["spacing"])
    if not ij or not voxel:
        return {}
    unit = ij.get("unit", "micron")
    unit = {"micron": "micrometer", "\\u00B5m": "micrometer"}.get(unit, OME_UNITS.get(unit, unit))
    return {"voxel_size": voxel, "unit": unit}
