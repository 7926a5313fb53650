"""OME-Zarr (NGFF 0.4 and 0.5): read an image at a resolution level; write predictions as 0.5.

Reading honours the image's ``axes``: t/c/z/y/x map onto unetflow's (C, Z, Y, X)
and a singleton t is dropped. The voxel size is the level's ``scale``.

Output layout (``pred.ome.zarr``), written by :func:`prepare_output` before the
blocks and :func:`finish_output` after them::

    probabilities                          labels
    pred.ome.zarr/  (image: multiscales)   pred.ome.zarr/           (ome version only)
      0/  (c, z, y, x) the engine writes     labels/                (labels: ["segmentation"])
      1/  mean-downsampled                     segmentation/        (image-label + multiscales)
      2/  ...                                    0/  (z, y, x) the engine writes
                                                 1/  nearest-downsampled ...

A label image belongs in an image's ``labels`` group; a prediction has no raw image
of its own, so the root holds only the ``labels`` group (open
``pred.ome.zarr/labels/segmentation`` in a viewer, or add the raw image as ``0``...).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from unetflow.errors import InputFormatError, OutputExistsError
from unetflow.formats import remote
from unetflow.formats.base import ImageArray

log = logging.getLogger(__name__)

NGFF_VERSION = "0.5"
LABEL_NAME = "segmentation"
LABEL_KINDS = ("labels", "instances")
AXIS_TYPES = {"c": "channel", "t": "time", "z": "space", "y": "space", "x": "space"}


# ---------------------------------------------------------------- reading


def ome_attrs(group: zarr.Group) -> dict[str, Any]:
    """The OME metadata of a group: ``attrs["ome"]`` (0.5) or the attributes themselves (0.4)."""
    attrs = dict(group.attrs)
    return dict(attrs["ome"]) if isinstance(attrs.get("ome"), dict) else attrs


def is_ome(group: zarr.Group) -> bool:
    ome = ome_attrs(group)
    return "multiscales" in ome or "labels" in ome or "labels" in _members(group)


def _members(group: zarr.Group) -> list[str]:
    try:
        return [name for name, _ in group.groups()]
    except Exception:  # noqa: BLE001 - listing is not supported by every remote store (http)
        return []


def open_zarr_node(path: str, *, level: int | None = None) -> Any:
    """A Zarr array or OME-Zarr image at *path* (local or URL): a ``zarr.Array`` or an :class:`ImageArray`."""
    try:
        node = remote.open_node(path) if remote.is_url(path) else zarr.open(store=path, mode="r")
    except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError, KeyError) as err:
        raise InputFormatError(f"input {path} does not open as Zarr ({type(err).__name__}: {err}); check the URL and credentials") from None
    if isinstance(node, zarr.Array):
        if level not in (None, 0):
            raise InputFormatError(f"input {path} is one Zarr array, not a multiscale image; leave out --level {level}")
        return node
    if not is_ome(node):
        raise InputFormatError(f"input {path} is a Zarr group without OME-Zarr multiscales; name an array inside it")
    return open_level(path, level=level)


def open_level(path: str, *, level: int | None = None) -> ImageArray:
    """The OME-Zarr image at *path* (an image group, or a group whose ``labels`` hold one) at *level*."""
    return ImageArray(path, lambda: _level_opener(path, level or 0), level=level, kind="ome-zarr")


def _level_opener(path: str, level: int) -> tuple[Any, list[str], dict[str, Any]]:
    group = remote.open_node(path) if remote.is_url(path) else zarr.open_group(store=path, mode="r")
    group = _image_group(group, path)
    ome = ome_attrs(group)
    ms = ome["multiscales"][0]
    datasets = ms["datasets"]
    if not 0 <= level < len(datasets):
        raise InputFormatError(f"input {path} has {len(datasets)} resolution levels; pass --level 0..{len(datasets) - 1}, not {level}")
    axes = [_axis_name(a) for a in ms.get("axes") or ["t", "c", "z", "y", "x"][-group[datasets[0]["path"]].ndim :]]
    array = group[datasets[level]["path"]]
    scale = _scale(ms, datasets[level])
    extras: dict[str, Any] = {"attrs": dict(array.attrs), "unit": _unit(ms)}
    if scale:
        extras["voxel_size"] = {a: s for a, s in zip(axes, scale) if a in "zyx"}
    return array, axes, extras


def _image_group(group: zarr.Group, path: str) -> zarr.Group:
    ome = ome_attrs(group)
    if "multiscales" in ome:
        return group
    if "labels" in _members(group) or "labels" in ome:
        labels = group["labels"]
        names = ome_attrs(labels).get("labels") or [n for n, _ in labels.groups()]
        if names:
            log.info("OME-Zarr %s has no image; opening its label image %s", path, names[0])
            return labels[names[0]]
    raise InputFormatError(f"input {path} has no OME-Zarr multiscales image; name an image group inside it")


def _axis_name(axis: Any) -> str:
    if isinstance(axis, str):
        return axis.lower()
    name = str(axis.get("name", "")).lower()
    kind = axis.get("type")
    if name in AXIS_TYPES:
        return name
    return {"channel": "c", "time": "t"}.get(kind, name)


def _scale(ms: dict[str, Any], dataset: dict[str, Any]) -> list[float] | None:
    scale = None
    for transforms in (dataset.get("coordinateTransformations") or [], ms.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and "scale" in t:
                scale = [float(v) for v in t["scale"]] if scale is None else [a * float(b) for a, b in zip(scale, t["scale"])]
    return scale


def _unit(ms: dict[str, Any]) -> str | None:
    for axis in ms.get("axes") or []:
        if isinstance(axis, dict) and axis.get("type") == "space" and axis.get("unit"):
            return str(axis["unit"])
    return None


# ---------------------------------------------------------------- writing


def wants_ome(path: str, *, ome: bool = False) -> bool:
    """An OME-Zarr output: asked for with ``--ome`` or by a path ending in ``.ome.zarr``."""
    return ome or str(path).rstrip("/").lower().endswith(".ome.zarr")


def level0_path(path: str, *, kind: str) -> str:
    """Where the block engine writes: the full-resolution array inside the OME-Zarr group."""
    return os.path.join(path, "labels", LABEL_NAME, "0") if kind in LABEL_KINDS else os.path.join(path, "0")


def prepare_output(path: str, *, kind: str, overwrite: bool) -> str:
    """Create the OME-Zarr group(s) of *path*; return the level-0 array path to create and write."""
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"output {path} already exists; pass --overwrite to replace it or choose another path")
    if os.path.exists(path):
        log.info("removing existing output %s (--overwrite)", path)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(store=path, mode="w", zarr_format=3, attributes={"ome": {"version": NGFF_VERSION}})
    if kind in LABEL_KINDS:
        labels = root.create_group("labels", attributes={"ome": {"version": NGFF_VERSION, "labels": [LABEL_NAME]}})
        labels.create_group(LABEL_NAME, attributes={"ome": {"version": NGFF_VERSION}})
    return level0_path(path, kind=kind)


def finish_output(
    path: str, *, kind: str, voxel_size: Sequence[float] | None = None, unit: str | None = None,
    name: str = "prediction", min_extent: int = 64, max_levels: int = 8,
) -> list[tuple[int, ...]]:
    """Downsample level 0 into a pyramid and write NGFF 0.5 multiscales metadata. Returns the level shapes.

    Each level halves y and x (and z when the voxels are about isotropic) until the
    larger of y, x is below *min_extent*. Probabilities are averaged (mean of 2x2(x2)),
    labels are subsampled (nearest), so no label value is ever invented.
    Memory is bounded by a few chunks: each level is computed chunk-wise from the
    one before, read back from disk.
    """
    group = zarr.open_group(store=os.path.dirname(level0_path(path, kind=kind)), mode="r+")
    level0 = group["0"]
    names = tuple(level0.metadata.dimension_names or ())
    spatial = [i for i, n in enumerate(names) if n in ("z", "y", "x")]
    voxel = list(voxel_size) if voxel_size and len(voxel_size) == len(spatial) else [1.0] * len(spatial)
    factors = _factors([names[i] for i in spatial], voxel)
    shapes = [tuple(level0.shape)]
    scales = [[1.0] * len(names)]
    translations = [[0.0] * len(names)]
    while len(shapes) < max_levels and _should_downsample(shapes[-1], names, factors, min_extent):
        prev = group[str(len(shapes) - 1)]
        arr = _downsample(group, prev, str(len(shapes)), factors=factors, names=names, kind=kind)
        scales.append([s * factors.get(n, 1) for s, n in zip(scales[-1], names)])
        translations.append([t + (0.0 if kind in LABEL_KINDS else (factors.get(n, 1) - 1) / 2 * s) for t, s, n in zip(translations[-1], scales[-2], names)])
        shapes.append(tuple(arr.shape))
    vox = dict(zip([names[i] for i in spatial], voxel))
    ms = multiscales_metadata(names, scales, translations, vox, unit=unit, name=name, kind=kind)
    attrs: dict[str, Any] = {"version": NGFF_VERSION, "multiscales": [ms]}
    if kind in LABEL_KINDS:
        attrs["image-label"] = {"version": NGFF_VERSION, "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}]}
    group.attrs["ome"] = attrs
    return shapes


def _factors(spatial: list[str], voxel: list[float]) -> dict[str, int]:
    out = {"y": 2, "x": 2}
    if "z" in spatial:
        vz = voxel[spatial.index("z")]
        vy = voxel[spatial.index("y")] if "y" in spatial else vz
        out["z"] = 2 if vz <= 1.5 * vy else 1  # anisotropic stacks (EM) keep their z resolution
    return out


def _should_downsample(shape: Sequence[int], names: Sequence[str], factors: dict[str, int], min_extent: int) -> bool:
    yx = [s for s, n in zip(shape, names) if n in ("y", "x")]
    return max(yx) >= min_extent and min(yx) >= 2


def _downsample(group: zarr.Group, prev: zarr.Array, key: str, *, factors: dict[str, int], names: Sequence[str], kind: str) -> zarr.Array:
    import dask.array as da

    f = {i: factors.get(n, 1) for i, n in enumerate(names)}
    src = da.from_zarr(prev)
    if kind in LABEL_KINDS:
        small = src[tuple(slice(None, None, f[i]) for i in range(src.ndim))]
    else:
        src = src[tuple(slice(0, (n // f[i]) * f[i]) for i, n in enumerate(src.shape))]
        small = da.coarsen(np.mean, src.astype(np.float32), f, trim_excess=True)
        if np.dtype(prev.dtype).kind in "ui":
            small = da.rint(small)
        small = small.astype(prev.dtype)
    chunks = tuple(min(c, max(s, 1)) for c, s in zip(prev.chunks, small.shape))
    out = group.create_array(
        key, shape=small.shape, chunks=chunks, dtype=prev.dtype, dimension_names=names,
        compressors=zarr.codecs.ZstdCodec(level=3), fill_value=0, overwrite=True,
    )
    da.store(small.rechunk(chunks), out, lock=False, scheduler="threads")
    log.info("pyramid level %s: %s", key, small.shape)
    return out


def multiscales_metadata(
    names: Sequence[str], scales: Sequence[Sequence[float]], translations: Sequence[Sequence[float]], voxel: dict[str, float],
    *, unit: str | None, name: str, kind: str,
) -> dict[str, Any]:
    """One NGFF 0.5 ``multiscales`` entry: axes, and per level a scale (x the voxel size) and translation."""
    axes = []
    for n in names:
        axis: dict[str, Any] = {"name": n, "type": AXIS_TYPES[n]}
        if AXIS_TYPES[n] == "space" and unit:
            axis["unit"] = unit
        axes.append(axis)
    datasets = []
    for i, (scale, shift) in enumerate(zip(scales, translations)):
        s = [v * voxel.get(n, 1.0) for v, n in zip(scale, names)]
        t = [v * voxel.get(n, 1.0) for v, n in zip(shift, names)]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": s}]
        if any(t):
            transforms.append({"type": "translation", "translation": t})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    method = "nearest (strided subsampling)" if kind in LABEL_KINDS else "mean"
    return {"name": name, "axes": axes, "datasets": datasets, "type": method.split()[0], "metadata": {"method": method, "writer": "unetflow"}}
