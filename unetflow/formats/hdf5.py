"""HDF5 datasets (the usual container of EM volumes), named as ``file.h5:/group/dataset``.

The file is opened read-only on first use in each process; slicing reads only the
HDF5 chunks a box touches. Voxel size comes from the common attributes
``element_size_um`` (ilastik, Fiji) or ``resolution`` (CREMI, in nm), when present.
"""

from __future__ import annotations

import os
import re
from typing import Any

import h5py

from unetflow.errors import InputFormatError, InputNotFoundError
from unetflow.formats.base import ImageArray, default_chunks

H5_PATTERN = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|he5))(?::(?P<dataset>/?.*))?$", re.IGNORECASE)


def is_hdf5(path: str) -> bool:
    return bool(H5_PATTERN.match(path))


def split(path: str) -> tuple[str, str | None]:
    """``"em.h5:/volumes/raw"`` -> ``("em.h5", "/volumes/raw")``; no dataset -> ``None``."""
    m = H5_PATTERN.match(path)
    if not m:
        raise InputFormatError(f"input {path} is not an HDF5 path; write it as file.h5:/group/dataset")
    return m["file"], (m["dataset"] or None)


def open_hdf5(path: str) -> ImageArray:
    """The dataset named in *path* (or the file's only dataset) as a lazy image."""
    file, _ = split(path)
    if not os.path.exists(file):
        raise InputNotFoundError(f"input {file} does not exist; check the path to the HDF5 file")
    return ImageArray(path, lambda: _opener(path), kind="hdf5")


def _opener(path: str) -> tuple[Any, str, dict[str, Any]]:
    file, name = split(path)
    try:
        handle = h5py.File(file, "r")
    except OSError as err:
        raise InputFormatError(f"input {file} is not a readable HDF5 file ({err}); check the file") from None
    if name is None:
        names: list[str] = []
        handle.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
        if len(names) != 1:
            raise InputFormatError(f"input {file} holds datasets {names[:5]}; name one as {file}:/{names[0] if names else 'dataset'}")
        name = names[0]
    obj = handle.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise InputFormatError(f"input {path}: {name} is not a dataset in {file}; name a dataset as {file}:/group/dataset")
    axes = _axes(obj)
    extras: dict[str, Any] = {"chunks": obj.chunks or default_chunks(obj.shape), "attrs": _plain_attrs(obj)}
    extras.update(_voxel_size(obj, axes))
    return obj, axes, extras


def _axes(ds: h5py.Dataset) -> str:
    labels = [d.label for d in ds.dims] if ds.ndim else []
    if labels and all(len(lab) == 1 for lab in labels):
        return "".join(labels).upper()
    return {2: "YX", 3: "ZYX", 4: "CZYX"}.get(ds.ndim, "")  # (C, Y, X) is told apart by the model's dims


def _voxel_size(ds: h5py.Dataset, axes: str) -> dict[str, Any]:
    spatial = [a.lower() for a in axes if a.lower() in "zyx"]
    for key, unit in (("element_size_um", "micrometer"), ("resolution", "nanometer")):
        value = ds.attrs.get(key)
        if value is not None and len(value) == len(spatial):
            return {"voxel_size": dict(zip(spatial, (float(v) for v in value))), "unit": unit}
    return {}


def _plain_attrs(ds: h5py.Dataset) -> dict[str, Any]:
    out = {}
    for k, v in ds.attrs.items():
        out[k] = v.tolist() if hasattr(v, "tolist") else v if isinstance(v, (str, int, float)) else str(v)
    return out
