"""OME-Zarr (NGFF 0.4 and 0.5): read an image at a resolution level; write predictions as 0.5.

Reading honours the image's ``axes``: t/c/z/y/x map onto unetflow's (C, Z, Y, X)
and a singleton t is dropped. The voxel size is the level's ``scale``.

Output layout (``pred.ome.zarr``), written by :func:`prepare_output` before the
blocks and :func:`finish_output` after them::

    probabilities                          labels / instances
    pred.ome.zarr/  (image: multiscales,   seg.ome.zarr/            (the input image: multiscales + omero,
                     omero per class)        0/ 1/ ...               its levels from --level on; --image copy|link)
      0/  (c, z, y, x) the engine writes     labels/                (labels: ["segmentation"])
      1/  mean-downsampled                     segmentation/        (image-label + multiscales)
      2/  ...                                    0/  (z, y, x) the engine writes
                                                 1/  nearest-downsampled ...

A label image belongs in an image's ``labels`` group, so the root of a labels output
holds the input image (:mod:`.omeroot`): viewers open the root as image + labels
(``--image none``: the labels alone, open ``seg.ome.zarr/labels/segmentation``).
Level 0 carries the scale and translation of the input level it was computed from;
an OME-Zarr input's coarser levels set the output's (issue 18).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from unetflow.errors import InputFormatError
from unetflow.formats import attach, omeroot, remote
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
    scale, shift = level_transform(ms, datasets[level], ndim=array.ndim)
    extras: dict[str, Any] = {"attrs": dict(array.attrs), "unit": _unit(ms)}
    extras["voxel_size"] = {a: s for a, s in zip(axes, scale) if a in "zyx"}
    extras["origin"] = {a: t for a, t in zip(axes, shift) if a in "zyx"}
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


def level_transform(ms: dict[str, Any], dataset: dict[str, Any], *, ndim: int) -> tuple[list[float], list[float]]:
    """A level's effective scale and translation, every axis: its own transforms, then the multiscale's.

    ``x = s_ms * (s_ds * i + t_ds) + t_ms``, so scale ``s_ms * s_ds`` and translation
    ``s_ms * t_ds + t_ms`` (NGFF 0.4 and 0.5 apply them in that order).

    >>> level_transform({}, {"coordinateTransformations": [{"type": "scale", "scale": [2.0, 1.0]},
    ...                   {"type": "translation", "translation": [0.5, 0.25]}]}, ndim=2)
    ([2.0, 1.0], [0.5, 0.25])
    """
    scale, shift = [1.0] * ndim, [0.0] * ndim
    for transforms in (dataset.get("coordinateTransformations") or [], ms.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and "scale" in t:
                scale = [a * float(b) for a, b in zip(scale, t["scale"])]
                shift = [a * float(b) for a, b in zip(shift, t["scale"])]
            elif t.get("type") == "translation" and "translation" in t:
                shift = [a + float(b) for a, b in zip(shift, t["translation"])]
    return scale, shift


def _unit(ms: dict[str, Any]) -> str | None:
    for axis in ms.get("axes") or []:
        if isinstance(axis, dict) and axis.get("type") == "space" and axis.get("unit"):
            return str(axis["unit"])
    return None


# ---------------------------------------------------------------- writing


def wants_ome(path: str, *, ome: bool = False) -> bool:
    """An OME-Zarr output: asked for with ``--ome``, by a path ending in ``.ome.zarr``, or
    by a path in an image's labels group (``IMAGE/labels/NAME``, :mod:`.attach`)."""
    return ome or str(path).rstrip("/").lower().endswith(".ome.zarr") or attach.target(path) is not None


def into_input(path: str) -> bool:
    """Whether *path* names labels to write into an input image's ``labels`` group (:mod:`.attach`)."""
    return attach.target(path) is not None


def level0_path(path: str, *, kind: str) -> str:
    """Where the block engine writes: the full-resolution array inside the OME-Zarr group
    (``OUTPUT/0`` for labels written into an input image's ``labels`` group)."""
    if attach.target(path) is not None:
        return os.path.join(path, "0")
    return os.path.join(path, "labels", LABEL_NAME, "0") if kind in LABEL_KINDS else os.path.join(path, "0")


def viewer_path(path: str, *, kind: str, image: str) -> str:
    """What to open in a viewer: the root, the label image of a labels output without an
    image, or the input image that labels were written into (image + its labels)."""
    into = attach.target(path)
    if into is not None:
        return into.image
    return os.path.join(path, "labels", LABEL_NAME) if kind in LABEL_KINDS and image == "none" else path


def prediction_path(path: str) -> str:
    """The prediction inside *path*: its label image where the root holds a copy of the input image."""
    try:
        group = zarr.open_group(store=path, mode="r")
    except Exception:  # noqa: BLE001 - a plain array, TIFF, URL...: the path itself
        return path
    ms = ome_attrs(group).get("multiscales") or [{}]
    content = (ms[0].get("metadata") or {}).get("content") if isinstance(ms[0], dict) else None
    return os.path.join(path, "labels", LABEL_NAME) if content == "input image" else path


def prepare_output(path: str, *, kind: str, overwrite: bool, kinds: Sequence[str] = ("segment",)) -> str:
    """Create the OME-Zarr group(s) of *path*; return the level-0 array path to create and write.

    An existing *path* is removed only with *overwrite* and only if unetflow wrote it as
    one of *kinds* (:func:`unetflow.store.clear_output`, issue 15)."""
    from unetflow import store

    into = attach.target(path)
    if into is not None:
        return attach.prepare(into, overwrite=overwrite)
    store.clear_output(path, overwrite=overwrite, kinds=kinds)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(store=path, mode="w", zarr_format=3, attributes={"ome": {"version": NGFF_VERSION}})
    if kind in LABEL_KINDS:
        labels = root.create_group("labels", attributes={"ome": {"version": NGFF_VERSION, "labels": [LABEL_NAME]}})
        labels.create_group(LABEL_NAME, attributes={"ome": {"version": NGFF_VERSION}})
    return level0_path(path, kind=kind)


@dataclass(frozen=True)
class Frame:
    """Where output level 0 lies in space, and which levels to build.

    *voxel_size* and *origin* are those of the input level the prediction was computed
    from (spatial axes, Z/Y/X order); *factors*, when given, are the input's coarser
    levels as whole subsampling factors over that level (:meth:`omeroot.Pyramid.factors`):
    the output's levels follow them. Without, levels halve until they are small.
    """

    voxel_size: tuple[float, ...] | None = None
    origin: tuple[float, ...] | None = None
    unit: str | None = None
    factors: tuple[dict[str, int], ...] | None = None

    def spatial(self, names: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
        """Voxel size and origin by axis name, for the spatial *names* of an output."""
        spatial = [n for n in names if n in ("z", "y", "x")]
        voxel = list(self.voxel_size) if self.voxel_size and len(self.voxel_size) == len(spatial) else [1.0] * len(spatial)
        origin = list(self.origin) if self.origin and len(self.origin) == len(spatial) else [0.0] * len(spatial)
        return dict(zip(spatial, voxel)), dict(zip(spatial, origin))


@dataclass(frozen=True)
class Contents:
    """What an output holds, for its viewer metadata: class names, and the input image for its root."""

    classes: int = 0
    class_names: tuple[str, ...] = ()
    image: str = "none"  # labels / instances: omeroot.IMAGE_MODES
    source: Any = None  # the input array (any format unetflow reads)
    has_channel: bool = False
    pyramid: Any = None  # omeroot.Pyramid of an OME-Zarr input
    source_name: str = "input"


def finish_output(
    path: str, *, kind: str, voxel_size: Sequence[float] | None = None, unit: str | None = None,
    name: str = "prediction", min_extent: int = 64, max_levels: int = 8, frame: Frame | None = None,
    contents: Contents | None = None,
) -> list[tuple[int, ...]]:
    """Downsample level 0 into a pyramid and write NGFF 0.5 metadata. Returns the level shapes.

    Each level halves y and x (and z when the voxels are about isotropic) until the
    larger of y, x is below *min_extent*, or follows ``frame.factors`` (the input's own
    levels). Probabilities are averaged (mean of 2x2(x2)), labels are subsampled
    (nearest), so no label value is ever invented. Memory is bounded by a few chunks:
    each level is computed chunk-wise from the one before, read back from disk.

    Every level carries the scale and translation of where its voxels lie: level 0 those
    of the input level it was computed from. Labels and instances get ``image-label``
    metadata, and with ``contents.image`` the input image at the root; probabilities
    (and images) get ``omero`` channels.
    """
    frame = frame or Frame(tuple(voxel_size) if voxel_size else None, None, unit)
    contents = contents or Contents()
    group = zarr.open_group(store=os.path.dirname(level0_path(path, kind=kind)), mode="r+")
    level0 = group["0"]
    names = tuple(level0.metadata.dimension_names or ())
    steps = _level_steps(level0.shape, names, frame, min_extent=min_extent, max_levels=max_levels, kind=kind)
    shapes, scales, translations = [tuple(level0.shape)], [[1.0] * len(names)], [[0.0] * len(names)]
    for step in steps:
        arr = _downsample(group, group[str(len(shapes) - 1)], str(len(shapes)), factors=step, names=names, kind=kind)
        scales.append([s * step.get(n, 1) for s, n in zip(scales[-1], names)])
        translations.append([t + (0.0 if kind in LABEL_KINDS else (step.get(n, 1) - 1) / 2 * s) for t, s, n in zip(translations[-1], scales[-2], names)])
        shapes.append(tuple(arr.shape))
    ms = multiscales_metadata(names, scales, translations, frame, name=name, kind=kind)
    attrs: dict[str, Any] = {"version": NGFF_VERSION, "multiscales": [ms]}
    if kind in LABEL_KINDS:
        with_image = contents.image != "none"
        attrs["image-label"] = omeroot.image_label(kind, classes=contents.classes, class_names=contents.class_names, with_image=with_image)
        if with_image:
            totals = _totals(steps)
            root = omeroot.write_root_image(path, mode=contents.image, source=contents.source, has_channel=contents.has_channel,
                                            pyramid=contents.pyramid, factors=totals, frame=frame, chunks=level0.chunks,
                                            name=contents.source_name)
            zarr.open_group(store=path, mode="r+").attrs["ome"] = {"version": NGFF_VERSION, **root}
    elif kind == "probabilities":
        attrs["omero"] = omeroot.omero_classes(int(level0.shape[0]), contents.class_names, dtype=str(level0.dtype))
    elif "c" in names:
        attrs["omero"] = omeroot.omero_image(group[str(len(shapes) - 1)], int(level0.shape[names.index("c")]))
    group.attrs["ome"] = attrs
    return shapes


def finish_prediction(path: str, *, kind: str, input_path: str, level: int | None, contents: Contents) -> list[tuple[int, ...]]:
    """:func:`finish_output` of a run's prediction, placed on the input level it was computed from.

    An OME-Zarr input gives level 0 its level's scale and translation, and the output
    one level per input level from there on (whole subsampling factors only). Labels
    written into the input's ``labels`` group get every input level (:func:`.attach.finish`).
    """
    import dataclasses

    into = attach.target(path)
    if into is not None:  # labels in the input's own labels group: on every input level's grid
        return attach.finish(into, kind=kind, classes=contents.classes, class_names=contents.class_names)
    source = contents.source
    pyramid = omeroot.input_pyramid(input_path, level)
    frame = Frame(
        tuple(getattr(source, "voxel_size", None) or ()) or None, tuple(getattr(source, "origin", None) or ()) or None,
        getattr(source, "unit", None), pyramid.factors() if pyramid is not None else None,
    )
    name = os.path.basename(input_path.rstrip("/")) or "input"
    return finish_output(path, kind=kind, frame=frame, contents=dataclasses.replace(contents, pyramid=pyramid, source_name=name))


def _level_steps(shape: Sequence[int], names: Sequence[str], frame: Frame, *, min_extent: int, max_levels: int,
                 kind: str) -> list[dict[str, int]]:
    """Per output level after the first: its subsampling factor over the level before."""
    if frame.factors is not None:
        steps, prev = [], {n: 1 for n in names}
        for total in frame.factors[: max_levels - 1]:
            steps.append({n: max(1, total.get(n, 1) // prev.get(n, 1)) for n in names if n in ("z", "y", "x")})
            prev = {n: total.get(n, 1) for n in names}
        return steps
    vox, _ = frame.spatial(names)
    factors = _factors(list(vox), list(vox.values()))
    steps, current = [], tuple(shape)
    while len(steps) + 1 < max_levels and _should_downsample(current, names, factors, min_extent):
        steps.append(dict(factors))
        f = [factors.get(a, 1) for a in names]  # labels keep the partial last voxel (strided), means drop it
        current = tuple(-(-n // k) if kind in LABEL_KINDS else n // k for n, k in zip(current, f))
    return steps


def _totals(steps: Sequence[dict[str, int]]) -> list[dict[str, int]]:
    """Cumulative factors over level 0 of per-level *steps*."""
    out, total = [], {}
    for step in steps:
        total = {n: total.get(n, 1) * f for n, f in step.items()}
        out.append(dict(total))
    return out


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
    names: Sequence[str], scales: Sequence[Sequence[float]], translations: Sequence[Sequence[float]], frame: Frame,
    *, name: str, kind: str,
) -> dict[str, Any]:
    """One NGFF 0.5 ``multiscales`` entry: axes, and per level a scale and translation.

    *scales* and *translations* are in level-0 voxels; ``frame`` turns them into space:
    ``scale * voxel`` and ``origin + translation * voxel``.
    """
    voxel, origin = frame.spatial(names)
    axes = []
    for n in names:
        axis: dict[str, Any] = {"name": n, "type": AXIS_TYPES[n]}
        if AXIS_TYPES[n] == "space" and frame.unit:
            axis["unit"] = frame.unit
        axes.append(axis)
    datasets = []
    for i, (scale, shift) in enumerate(zip(scales, translations)):
        s = [v * voxel.get(n, 1.0) for v, n in zip(scale, names)]
        t = [origin.get(n, 0.0) + v * voxel.get(n, 1.0) for v, n in zip(shift, names)]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": s}]
        if any(t):
            transforms.append({"type": "translation", "translation": t})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    method = "nearest (strided subsampling)" if kind in LABEL_KINDS else "mean"
    return {"name": name, "axes": axes, "datasets": datasets, "type": method.split()[0], "metadata": {"method": method, "writer": "unetflow"}}
