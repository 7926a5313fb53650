"""Labels written into the input OME-Zarr's own ``labels`` group (issue 18).

The NGFF way to attach a segmentation to an image: ``OUTPUT`` is ``INPUT/labels/NAME``
and the run writes the label image there, next to any labels the image already has::

    raw.ome.zarr/                      the input image: never written
      zarr.json  0/ 1/ ...
      labels/                          created if absent; ome.labels lists NAME (kept: the others)
        NAME/                          image-label (source.image "../../") + multiscales
          0/ 1/ ...                    one level per input level, on that level's grid
    raw.ome.zarr.labels-NAME.unetflow/ the run folder (markers, lock, report): beside the input,
                                       outside its Zarr hierarchy

:func:`target` recognises such an OUTPUT from its path and the folder it names;
:func:`check` refuses one the run cannot write (before any block runs, nothing written);
:func:`prepare` makes the label group; :func:`register` lists it once every block is done.
Only the ``labels`` group and the label's own group are ever written or removed.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from typing import Any, Sequence

from unetflow.errors import ConfigError, OutputWriteError
from unetflow.resume import LABELS, Target, beside, target  # noqa: F401 - the path rules live with the run folder

log = logging.getLogger(__name__)

NGFF_VERSION = "0.5"


def check(t: Target, *, input_path: str, kind: str, level: int | None) -> None:
    """Refuse labels the run cannot write into *input_path*'s ``labels`` group; touches nothing.

    Raises
    ------
    ConfigError
        OUTPUT lies in another image, probabilities, ``--level`` above 0, or an input that
        is not a local OME-Zarr 0.5 image whose levels a label image can follow.
    """
    where = f"labels cannot be written into {t.image}"
    separate = f"write a separate output instead (e.g. {os.path.basename(t.image.rstrip('/')).split('.')[0]}-{t.name}.ome.zarr)"
    if "://" in input_path or os.path.realpath(input_path) != os.path.realpath(t.image):
        raise ConfigError(f"output {t.path} lies in the labels group of {t.image}, not of the input {input_path}; "
                          f"labels go into the input's own group (INPUT/labels/NAME), or {separate}")
    if kind not in ("labels", "instances"):
        raise ConfigError(f"{where}: --output {kind} is not a label image; pass --output labels or instances, or {separate}")
    meta = _metadata(t.image)
    if meta is None:
        raise ConfigError(f"{where}: it is a Zarr v2 store (OME-Zarr 0.4) and its labels would be Zarr v3; convert it "
                          f"(unetflow convert {t.image} NEW.ome.zarr) and write into that, or {separate}")
    if "multiscales" not in meta:
        raise ConfigError(f"{where}: it is not an OME-Zarr image (no multiscales in its zarr.json); {separate}")
    if os.path.isdir(t.labels) and not os.path.isfile(os.path.join(t.labels, "zarr.json")):
        raise ConfigError(f"{where}: its labels folder {t.labels} is not a Zarr v3 group (no zarr.json); "
                          f"move that folder away, or {separate}")
    if level:
        raise ConfigError(f"{where} with --level {level}: a label image must have every level of its image, from level 0; "
                          f"leave out --level, or {separate} with --level {level}")
    axes = [str(a.get("name", "")).lower() if isinstance(a, dict) else str(a).lower() for a in meta["multiscales"][0].get("axes") or []]
    if not {"y", "x"} <= set(axes):
        raise ConfigError(f"{where}: its axes {axes} have no y and x; {separate}")


def _metadata(image: str) -> dict[str, Any] | None:
    """The OME attributes of a Zarr v3 image group, or None for a Zarr v2 one."""
    path = os.path.join(image, "zarr.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        attrs = json.load(f).get("attributes") or {}
    ome = attrs.get("ome")
    return dict(ome) if isinstance(ome, dict) else {}


def check_writable(t: Target) -> None:
    """The folders and file the run writes are writable and not write-protected.

    Root may write anywhere, so the mode bits are read too: an input made read-only
    with ``chmod a-w`` is one its owner means to keep as it is.

    Raises
    ------
    OutputWriteError
    """
    paths = [t.image] if not os.path.isdir(t.labels) else [t.labels, os.path.join(t.labels, "zarr.json")]
    for path in paths:
        if not os.path.exists(path):
            continue
        reason = _not_writable(path)
        if reason:
            raise OutputWriteError(f"labels cannot be written into {t.image}: {path} {reason}; make it writable "
                                   f"(chmod u+w {path}) or write a separate output (e.g. seg.ome.zarr)")


def _not_writable(path: str) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    except OSError:
        pass
    mode = os.stat(path).st_mode
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK):
        return f"is write-protected (mode {stat.filemode(mode)})"
    return ""


def prepare(t: Target, *, overwrite: bool) -> str:
    """Make the (empty) label group ``image/labels/name``; return the level-0 array path.

    With *overwrite* an earlier label of this name that unetflow wrote is removed first,
    with its entry in ``labels`` (only that group: :func:`unetflow.store.clear_output`
    refuses anything unetflow did not write). The label is listed by :func:`register`.
    """
    import zarr

    from unetflow import store

    store.clear_output(t.path, overwrite=overwrite, kinds=("segment",))
    if os.path.isdir(t.labels):
        _set_listed(t, listed=False)
    else:
        zarr.open_group(store=t.labels, mode="w", zarr_format=3, attributes={"ome": {"version": NGFF_VERSION, LABELS: []}})
    zarr.open_group(store=t.path, mode="w", zarr_format=3, attributes={"ome": {"version": NGFF_VERSION}})
    log.info("label image %s created in the input's labels group", t.path)
    return os.path.join(t.path, "0")


def finish(t: Target, *, kind: str, classes: int, class_names: Sequence[str]) -> list[tuple[int, ...]]:
    """Once every block is done: the label's levels on the input's, its metadata, its listing.

    Label level *k* is level 0 sampled (nearest, so no label is invented) onto input
    level *k*'s grid: its spatial shape, scale and translation, whatever its factors
    (ome-zarr-py writes 2.0625 for 33 -> 16). Returns the level shapes.
    """
    import zarr

    from unetflow.formats import omeroot, omezarr

    group = zarr.open_group(store=t.path, mode="r+")
    level0 = group["0"]
    names = tuple(level0.metadata.dimension_names or ())
    grids = input_grids(t.image, names)
    shapes = [tuple(level0.shape)]
    for k, (shape, scale, shift) in enumerate(grids[1:], start=1):
        index = [nearest_index(n0, s0, t0, n, s, tr) for n0, s0, t0, n, s, tr in zip(level0.shape, grids[0][1], grids[0][2], shape, scale, shift)]
        shapes.append(_resample(group, level0, str(k), index, names=names))
    axes = [{"name": n, "type": omezarr.AXIS_TYPES[n]} for n in names]
    datasets = []
    for k, (_, scale, shift) in enumerate(grids):
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": list(scale)}]
        if any(shift):
            transforms.append({"type": "translation", "translation": list(shift)})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    method = "nearest (onto each level of the image)"
    ms = {"name": t.name, "axes": axes, "datasets": datasets, "type": "nearest", "metadata": {"method": method, "writer": "unetflow"}}
    label = omeroot.image_label(kind, classes=classes, class_names=class_names, with_image=True)
    group.attrs["ome"] = {"version": NGFF_VERSION, "multiscales": [ms], "image-label": label}
    register(t)
    return shapes


def input_grids(image: str, names: Sequence[str]) -> list[tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]]:
    """(shape, scale, translation) of every level of the image at *image*, on the spatial *names*."""
    import zarr

    from unetflow.formats import omezarr

    group = zarr.open_group(store=image, mode="r")
    ms = omezarr.ome_attrs(group)["multiscales"][0]
    axes = [omezarr._axis_name(a) for a in ms.get("axes") or []]
    out = []
    for ds in ms["datasets"]:
        array = group[ds["path"]]
        scale, shift = omezarr.level_transform(ms, ds, ndim=array.ndim)
        pick = [axes.index(n) for n in names]
        out.append((tuple(int(array.shape[i]) for i in pick), tuple(scale[i] for i in pick), tuple(shift[i] for i in pick)))
    return out


def nearest_index(n0: int, s0: float, t0: float, n: int, s: float, t: float) -> Any:
    """For each voxel of an axis of *n* voxels at scale *s*, translation *t*: the nearest of
    level 0's *n0* voxels (scale *s0*, translation *t0*), by voxel centres.

    >>> nearest_index(8, 1.0, 0.0, 4, 2.0, 0.5).tolist()  # centres 0.5, 2.5, ...: voxels 1, 3, 5, 7 (ties up)
    [1, 3, 5, 7]
    >>> nearest_index(8, 1.0, 0.0, 4, 2.0, 0.0).tolist()  # no translation: strided
    [0, 2, 4, 6]
    """
    import numpy as np

    centres = (np.arange(n) * s + t - t0) / s0
    return np.clip(np.floor(centres + 0.5), 0, n0 - 1).astype(np.int64)


def _resample(group: Any, level0: Any, key: str, index: Sequence[Any], *, names: Sequence[str]) -> tuple[int, ...]:
    """Write level 0 gathered at *index* (one index array per axis) as *key*, chunk by chunk."""
    import dask.array as da
    import zarr

    src = da.from_zarr(level0)
    for axis, idx in enumerate(index):
        src = da.take(src, idx, axis=axis)
    chunks = tuple(min(c, max(s, 1)) for c, s in zip(level0.chunks, src.shape))
    out = group.create_array(key, shape=src.shape, chunks=chunks, dtype=level0.dtype, dimension_names=tuple(names),
                             compressors=zarr.codecs.ZstdCodec(level=3), fill_value=0, overwrite=True)
    da.store(src.rechunk(chunks), out, lock=False, scheduler="threads")
    log.info("label level %s: %s", key, src.shape)
    return tuple(int(v) for v in src.shape)


def register(t: Target) -> None:
    """List the finished label image in ``image/labels`` (others listed stay listed)."""
    _set_listed(t, listed=True)
    log.info("label image %s listed in %s", t.name, t.labels)


def _set_listed(t: Target, *, listed: bool) -> None:
    import zarr

    group = zarr.open_group(store=t.labels, mode="r+")
    ome = dict(group.attrs.get("ome") or {})
    names = [n for n in ome.get(LABELS) or [] if n != t.name] + ([t.name] if listed else [])
    group.attrs["ome"] = {**ome, "version": ome.get("version", NGFF_VERSION), LABELS: names}
