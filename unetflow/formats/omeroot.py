"""What makes an OME-Zarr output open right in viewers (issue 18).

- :func:`input_pyramid`: an OME-Zarr input's levels from the one a run computed on,
  with each level's scale and translation, so output levels line up with them.
- :func:`write_root_image`: the input image at the root of a labels / instances
  output (``--image copy``: its chunk files copied, or re-encoded where they are not
  Zarr v3; ``--image link``: each level a symlink to the input's), so that opening
  the root shows the image with the labels under ``labels/``, as NGFF intends.
- :func:`omero`, :func:`image_label`: named, coloured channels and visible labels
  (a colour per class, or none at all so viewers colour every object).

Everything streams chunk by chunk (a file copy, or ``dask.array.store``): memory is a
few chunks, never a level.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from unetflow.errors import ConfigError
from unetflow.formats import remote

log = logging.getLogger(__name__)

SPATIAL = ("z", "y", "x")
# tab10: distinct on black and on grey images
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
MAX_COLORED_CLASSES = 256  # more classes than this get no colors list: the viewer's own colormap
SMALL_BYTES = 64 * 2**20  # a level this small is read whole for a display window


@dataclass(frozen=True)
class Level:
    """One input level: its array path in the image group, shape, and effective transform (every axis)."""

    path: str
    shape: tuple[int, ...]
    scale: tuple[float, ...]
    translation: tuple[float, ...]


@dataclass(frozen=True)
class Pyramid:
    """An OME-Zarr input image from the level a run computed on: the levels output levels follow.

    Only levels whose scale is a whole multiple of the first one's (per axis, and of the
    level before) are kept, so every output level is a strided or mean subsampling of
    the one before.
    """

    group: str  # the image group's path or URL
    axes: tuple[dict[str, Any], ...]
    levels: tuple[Level, ...]
    omero: dict[str, Any] | None
    zarr_format: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(str(a["name"]) for a in self.axes)

    def factors(self) -> tuple[dict[str, int], ...]:
        """Per level after the first: its spatial subsampling factor over the first level."""
        first = self.levels[0]
        return tuple({n: round(s / s0) for n, s, s0 in zip(self.names, lvl.scale, first.scale) if n in SPATIAL}
                     for lvl in self.levels[1:])


def input_pyramid(path: str, level: int | None, *, max_levels: int = 8) -> Pyramid | None:
    """The OME-Zarr image at *path* from *level* on, or None when *path* is no OME-Zarr image."""
    from unetflow.formats import omezarr

    try:
        node = remote.open_node(path) if remote.is_url(path) else zarr.open(store=path, mode="r")
    except Exception:  # noqa: BLE001 - TIFF, HDF5 or anything else that is not Zarr: no pyramid
        return None
    if isinstance(node, zarr.Array) or not omezarr.is_ome(node):
        return None
    group = omezarr._image_group(node, path)
    ms = omezarr.ome_attrs(group)["multiscales"][0]
    datasets = ms["datasets"][level or 0:]
    names = [omezarr._axis_name(a) for a in ms.get("axes") or []]
    axes = tuple(a if isinstance(a, dict) else {"name": n, "type": omezarr.AXIS_TYPES.get(n, "space")}
                 for a, n in zip(ms.get("axes") or [], names))
    levels: list[Level] = []
    for ds in datasets[:max_levels]:
        array = group[ds["path"]]
        scale, shift = omezarr.level_transform(ms, ds, ndim=array.ndim)
        if levels and not _whole_multiple(levels[-1].scale, scale, names):
            break
        levels.append(Level(ds["path"], tuple(int(s) for s in array.shape), tuple(scale), tuple(shift)))
    omero = omezarr.ome_attrs(group).get("omero")
    base = path.rstrip("/") if group.path in ("", "/") else f"{path.rstrip('/')}/{group.path}"
    return Pyramid(base, axes, tuple(levels), omero if isinstance(omero, dict) else None, int(group.metadata.zarr_format))


def _whole_multiple(prev: Sequence[float], scale: Sequence[float], names: Sequence[str]) -> bool:
    for n, a, b in zip(names, prev, scale):
        if n in SPATIAL:
            r = b / a if a else 0.0
            if r < 1 - 1e-6 or abs(r - round(r)) > 1e-3:
                return False
    return True


def check_root_image(input_path: str, *, level: int | None, mode: str) -> None:
    """Refuse an ``--image`` mode the input cannot give, before anything is written.

    Raises
    ------
    ConfigError
        ``link`` of an input that is not a local OME-Zarr 0.5 image with dimension names.
    """
    if mode != "link":
        return
    pyramid = None if remote.is_url(input_path) else input_pyramid(input_path, level)
    why = ("it is remote" if remote.is_url(input_path) else "it is not an OME-Zarr image" if pyramid is None
           else f"its arrays are Zarr v{pyramid.zarr_format}, not v3 (OME-Zarr 0.4)" if pyramid.zarr_format != 3 else "")
    if not why and pyramid is not None:
        for lvl in pyramid.levels:
            names = zarr.open_array(store=os.path.join(pyramid.group, lvl.path), mode="r").metadata.dimension_names
            if tuple(names or ()) != pyramid.names:
                why = f"its level {lvl.path} has dimension names {names}, not {pyramid.names}"
    if why:
        raise ConfigError(f"input {input_path} cannot be linked into the output with --image link: {why}; pass --image copy")


def write_root_image(path: str, *, mode: str, source: Any, has_channel: bool, pyramid: Pyramid | None,
                     factors: Sequence[dict[str, int]], frame: Any, chunks: Sequence[int], name: str) -> dict[str, Any]:
    """Put the input image at the root of the output at *path*; return its ``multiscales`` and ``omero``.

    With a *pyramid* the input's own levels are copied (or linked) as ``0``, ``1``, ...;
    otherwise *source* (any input unetflow reads) is copied as ``0`` and mean-downsampled
    by *factors*, the labels' own level factors, so image and labels have the same levels.
    """
    from unetflow.formats import omezarr

    if pyramid is not None:
        for k, lvl in enumerate(pyramid.levels[: len(factors) + 1]):
            _place(os.path.join(pyramid.group, lvl.path), os.path.join(path, str(k)), mode=mode, names=pyramid.names)
        datasets = []
        for k, lvl in enumerate(pyramid.levels[: len(factors) + 1]):
            transforms: list[dict[str, Any]] = [{"type": "scale", "scale": list(lvl.scale)}]
            if any(lvl.translation):
                transforms.append({"type": "translation", "translation": list(lvl.translation)})
            datasets.append({"path": str(k), "coordinateTransformations": transforms})
        ms = {"name": name, "axes": [dict(a) for a in pyramid.axes], "datasets": datasets, "metadata": {"writer": "unetflow", "content": "input image"}}
        coarsest = zarr.open_array(store=os.path.join(path, str(len(datasets) - 1)), mode="r")
        channels = _channel_count(pyramid.names, coarsest.shape)
        om = pyramid.omero if pyramid.omero and len(pyramid.omero.get("channels") or []) == channels else omero_image(coarsest, channels)
        return {"multiscales": [ms], "omero": om}
    spatial = len(source.shape) - has_channel
    names = (("c",) if has_channel else ()) + SPATIAL[-spatial:]
    group = zarr.open_group(store=path, mode="r+")
    level = _copy_array(source, group, "0", names=names, chunks=((source.shape[0],) if has_channel else ()) + tuple(chunks[-spatial:]))
    scales, shifts = [[1.0] * len(names)], [[0.0] * len(names)]
    for k, total in enumerate(factors, start=1):
        prev_total = factors[k - 2] if k > 1 else {}
        step = {n: total.get(n, 1) // prev_total.get(n, 1) for n in names}
        level = omezarr._downsample(group, level, str(k), factors=step, names=names, kind="image")
        scales.append([s * step.get(n, 1) for s, n in zip(scales[-1], names)])
        shifts.append([t + (step.get(n, 1) - 1) / 2 * s for t, s, n in zip(shifts[-1], scales[-2], names)])
    ms = omezarr.multiscales_metadata(names, scales, shifts, frame, name=name, kind="image")
    ms["metadata"]["content"] = "input image"
    return {"multiscales": [ms], "omero": omero_image(level, _channel_count(names, level.shape))}


def _channel_count(names: Sequence[str], shape: Sequence[int]) -> int:
    return int(shape[list(names).index("c")]) if "c" in names else 1


def _place(src: str, dst: str, *, mode: str, names: Sequence[str]) -> None:
    """One input level at *dst*: a symlink (link), a file copy (a local Zarr v3 array with
    the right dimension names), else a chunk-wise re-encode to Zarr v3."""
    if os.path.islink(dst) or os.path.isfile(dst):
        os.remove(dst)
    elif os.path.isdir(dst):
        shutil.rmtree(dst)
    if mode == "link":
        os.symlink(os.path.abspath(src), dst, target_is_directory=True)
        return
    array = remote.open_node(src) if remote.is_url(src) else zarr.open_array(store=src, mode="r")
    if not remote.is_url(src) and array.metadata.zarr_format == 3 and tuple(array.metadata.dimension_names or ()) == tuple(names):
        shutil.copytree(src, dst)  # chunk files as they are: no decode, no re-encode
        return
    parent, key = os.path.split(dst)
    _copy_array(array, zarr.open_group(store=parent, mode="r+"), key, names=names, chunks=array.chunks)


def _copy_array(source: Any, group: zarr.Group, key: str, *, names: Sequence[str], chunks: Sequence[int]) -> zarr.Array:
    import dask.array as da

    chunks = tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, source.shape))
    src = da.from_array(source, chunks=tuple(getattr(source, "chunks", None) or chunks), lock=True, asarray=True)
    out = group.create_array(key, shape=source.shape, chunks=chunks, dtype=source.dtype, dimension_names=tuple(names),
                             compressors=zarr.codecs.ZstdCodec(level=3), fill_value=0, overwrite=True)
    da.store(src.rechunk(chunks), out, lock=False, scheduler="threads")
    log.info("input image copied to %s/%s: %s", group.store, key, source.shape)
    return out


def _hex(rgb: Sequence[int]) -> str:
    return "".join(f"{int(v):02X}" for v in rgb)


def _window(array: Any) -> dict[str, float]:
    dtype = np.dtype(array.dtype)
    if int(np.prod(array.shape)) * dtype.itemsize <= SMALL_BYTES:
        data = np.asarray(array[...])
        lo, hi = (float(v) for v in np.percentile(data, [0.1, 99.9])) if data.size else (0.0, 1.0)
        return {"min": float(data.min()) if data.size else 0.0, "max": float(data.max()) if data.size else 1.0, "start": lo, "end": max(hi, lo + 1e-6)}
    top = float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0
    return {"min": 0.0, "max": top, "start": 0.0, "end": top}


def omero_image(array: Any, channels: int) -> dict[str, Any]:
    """``omero`` of an image: one grey channel, or coloured ones, windowed on the (small) coarsest level."""
    window = _window(array)
    colors = ["FFFFFF"] if channels == 1 else [_hex(PALETTE[i % len(PALETTE)]) for i in range(channels)]
    return {"channels": [{"label": f"channel {i}", "color": colors[i], "window": dict(window), "active": True}
                         for i in range(channels)], "rdefs": {"model": "color"}}


def class_labels(classes: int, class_names: Sequence[str]) -> list[str]:
    """The model's class names, or ``class 0`` .. ``class K-1`` where it has none (or too few)."""
    names = list(class_names)
    return [names[i] if i < len(names) and names[i] else f"class {i}" for i in range(classes)]


def omero_classes(classes: int, class_names: Sequence[str], *, dtype: str) -> dict[str, Any]:
    """``omero`` of a probability output: a channel per class, named, coloured, windowed 0-1 (0-255 for uint8)."""
    top = 255.0 if np.dtype(dtype) == np.uint8 else 1.0
    window = {"min": 0.0, "max": top, "start": 0.0, "end": top}
    return {"channels": [{"label": name, "color": _hex(PALETTE[i % len(PALETTE)]), "window": dict(window), "active": True}
                         for i, name in enumerate(class_labels(classes, class_names))], "rdefs": {"model": "color"}}


def image_label(kind: str, *, classes: int, class_names: Sequence[str], with_image: bool) -> dict[str, Any]:
    """``image-label`` of a labels (class map) or instances output.

    A class map lists every class (0 transparent, the others distinct and opaque) with
    its name in ``properties``; instances list no colours at all, so a viewer's own
    label colormap colours each object (a list of label 0 alone makes napari draw none).
    """
    out: dict[str, Any] = {"version": "0.5"}
    if with_image:
        out["source"] = {"image": "../../"}
    if kind == "labels" and classes <= MAX_COLORED_CLASSES:
        out["colors"] = [{"label-value": i, "rgba": [0, 0, 0, 0] if i == 0 else [*PALETTE[(i - 1) % len(PALETTE)], 255]} for i in range(classes)]
        out["properties"] = [{"label-value": i, "class": name} for i, name in enumerate(class_labels(classes, class_names))]
    return out
