"""Any input (TIFF, TIFF slices, HDF5, OME-Zarr level, remote Zarr) to a Zarr v3 array or OME-Zarr image.

The copy runs in parallel threads, one write unit (a shard, else a chunk) per task,
so no two tasks write one chunk and memory holds at most ``workers`` units.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import zarr

from unetflow.errors import OutputWriteError, ShapeError
from unetflow.formats import omezarr
from unetflow.geometry import grid_boxes

log = logging.getLogger(__name__)


def convert(
    source: Any, output: str, *, chunks: Sequence[int] | None = None, shards: Sequence[int] | None = None,
    workers: int = 4, overwrite: bool = False, ome: bool = False, on_progress: Callable[[int], None] | None = None,
) -> zarr.Array:
    """Copy *source* (an array with ``shape``, ``dtype``, ``chunks``, slicing) into a new Zarr v3 array at *output*.

    *chunks* and *shards* cover every axis, or only the last ones (leading axes then
    get chunk 1). Returns the written array. ``on_progress(n)`` is called per unit.
    """
    shape = tuple(int(s) for s in source.shape)
    chunks = _full(chunks or _default_chunks(shape), shape, what="chunks")
    shards = _full(shards, shape, what="shards") if shards else None
    if shards and any(s % c for s, c in zip(shards, chunks)):
        raise ShapeError(f"shards {shards} are not whole chunks {chunks}; pass --shards as multiples of --chunks")
    names = tuple(getattr(source, "dimension_names", None) or ()) or None
    ome = omezarr.wants_ome(output, ome=ome)
    if ome and (not names or not set(names) <= set(omezarr.AXIS_TYPES)):
        names = ("c", "z", "y", "x")[-len(shape):]  # NGFF needs named axes
    path = _prepare(output, overwrite=overwrite, ome=ome)
    out = zarr.create_array(
        store=path, shape=shape, chunks=chunks, shards=shards, dtype=source.dtype, fill_value=0,
        compressors=zarr.codecs.ZstdCodec(level=3), dimension_names=names, zarr_format=3,
        attributes={"unetflow": {"converted_from": str(getattr(source, "path", "") or getattr(source, "store_path", ""))}},
    )
    unit = shards or chunks
    boxes = [box for _, box in grid_boxes(shape, unit)]

    def copy(box: Any) -> int:
        data = source[box.to_slices()]
        try:
            out[box.to_slices()] = data
        except OSError as err:  # disk full, read-only: one line naming the box and the cause
            raise OutputWriteError(
                f"output {output} box offset {list(box.offset)} shape {list(box.shape)} could not be written "
                f"({err.strerror or err}, errno {err.errno}); free space or choose another location, then run again with --overwrite"
            ) from None
        return 1

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done in pool.map(copy, boxes):
            if on_progress:
                on_progress(done)
    if ome:
        omezarr.finish_output(output, kind="image", voxel_size=getattr(source, "voxel_size", None), unit=getattr(source, "unit", None), name=os.path.basename(output))
    log.info("converted %s to %s: %s %s in %d units", getattr(source, "path", source), output, shape, source.dtype, len(boxes))
    return out


def n_units(shape: Sequence[int], chunks: Sequence[int] | None, shards: Sequence[int] | None) -> int:
    import math

    unit = _full(shards, shape, what="shards") if shards else _full(chunks or _default_chunks(shape), shape, what="chunks")
    return math.prod(-(-s // u) for s, u in zip(shape, unit))


def _prepare(output: str, *, overwrite: bool, ome: bool) -> str:
    """Make room for *output*: ``--overwrite`` removes only an earlier convert's store
    (its ``unetflow.converted_from`` attribute says so) or an empty folder."""
    from unetflow import store

    if ome:
        return omezarr.prepare_output(output, kind="image", overwrite=overwrite, kinds=("convert",))
    store.clear_output(output, overwrite=overwrite, kinds=("convert",))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    return output


def _full(values: Sequence[int], shape: Sequence[int], *, what: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) > len(shape):
        raise ShapeError(f"{what} {values} has {len(values)} axes but the image {tuple(shape)} has {len(shape)}; give at most {len(shape)} numbers")
    full = (1,) * (len(shape) - len(values)) + values
    return tuple(min(v, max(s, 1)) for v, s in zip(full, shape))


def _default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    spatial = 3 if len(shape) >= 3 else 2
    return (64, 256, 256)[-spatial:] if spatial == 3 else (512, 512)
