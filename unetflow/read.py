"""Reading a block's input: rows in whole input chunks, and the skip rules (empty
input, outside the mask) that decide whether a block runs at all."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from unetflow import finite, formats, store
from unetflow.geometry import Box
from unetflow.job import BlockJob
from unetflow.plan import Block

@lru_cache(maxsize=8)
def _open_input(path: str, level: int | None = None) -> Any:
    return formats.open_input(path, level=level)


class RowReader:
    """A block's rows of input (each a patch deep along axis 0), read in whole input
    chunks along axis 0 and kept while later rows need them: consecutive rows overlap,
    and each chunk is decoded once (reading each row on its own decoded the chunks
    under an overlap twice). Inputs chunked deeper than four patches are read row by row.
    """

    def __init__(self, job: BlockJob, block: Block) -> None:
        self.job = job
        self.array = _open_input(job.input_path, job.input_level)
        chunks = getattr(self.array, "chunks", None)
        depth = int(chunks[1 if job.layout.has_channel else 0]) if chunks else 0
        self.depth = depth if 0 < depth <= 4 * job.plan.tiling.patch[0] else 0
        self.lo, self.hi = block.read_box.offset[0], block.read_box.stop[0]
        self._slabs: dict[int, np.ndarray] = {}

    def _read(self, box: Box) -> np.ndarray:
        j = self.job
        raw = store.read_box(self.array, box, layout=j.layout, mode=j.tiling.mirror, name=j.input_path)
        return finite.finite_block(raw, nan_value=j.nan_value, name=j.input_path, box=box)  # issue 15: before normalising

    def __call__(self, box: Box) -> list[np.ndarray]:
        """The raw input of *box*, as consecutive parts along axis 0 (views of the kept
        chunks: not joined, so no row-sized copy is made on the host)."""
        if not self.depth:
            return [self._read(box)]
        d, z0, z1 = self.depth, box.offset[0], box.stop[0]
        first, last = z0 // d, (z1 - 1) // d
        for k in [k for k in self._slabs if k < first]:
            del self._slabs[k]
        parts = []
        for k in range(first, last + 1):
            if k not in self._slabs:
                a, b = max(k * d, self.lo), min((k + 1) * d, self.hi)
                self._slabs[k] = self._read(Box((a, *box.offset[1:]), (b - a, *box.shape[1:])))
            a = max(k * d, self.lo)
            parts.append(self._slabs[k][:, max(z0, a) - a : min(z1, (k + 1) * d) - a])
        return parts



def skip_reason(job: BlockJob, block: Block) -> str:
    """``"mask"`` if the block lies outside the foreground mask, ``"empty"`` if its
    input is constant (or below ``skip_threshold``) and ``skip_empty`` is on, else ``""``."""
    if job.skip.mask and not mask_has_foreground(job.skip.mask, block.write_box, job.layout.spatial_shape):
        return "mask"
    if job.skip.empty and input_is_empty(job, block):
        return "empty"
    return ""


def scale_box(box: Box, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> Box:
    """*box* in image voxels -> the mask voxels that cover it (any mask resolution).

    >>> scale_box(Box((4, 0), (4, 3)), (8, 6), (2, 3))
    Box(offset=(1, 0), shape=(1, 2))
    """
    lo = [o * m // n for o, m, n in zip(box.offset, mask_shape, image_shape)]
    hi = [max(a + 1, -(-(o + s) * m // n)) for a, o, s, m, n in zip(lo, box.offset, box.shape, mask_shape, image_shape)]
    return Box.from_bounds(lo, [min(h, m) for h, m in zip(hi, mask_shape)])


def mask_has_foreground(mask_path: str, box: Box, image_shape: tuple[int, ...]) -> bool:
    mask = _open_input(mask_path)
    mask_shape = tuple(int(n) for n in mask.shape[-len(image_shape):])
    layout = store.Layout(len(mask.shape) > len(image_shape), 1, mask_shape)
    region = store.read_box(mask, scale_box(box, image_shape, mask_shape), layout=layout, name=mask_path)
    return bool(np.any(region))


def input_is_empty(job: BlockJob, block: Block, planes: int = 64) -> bool:
    """Whether the block's raw read box is constant or (with a threshold) all below it.

    Read in slabs of *planes* along axis 0, stopping at the first sign of signal."""
    rb = block.read_box
    lo, hi = math.inf, -math.inf
    for z in range(rb.offset[0], rb.stop[0], planes):
        box = Box((z, *rb.offset[1:]), (min(planes, rb.stop[0] - z), *rb.shape[1:]))
        raw = store.read_box(_open_input(job.input_path, job.input_level), box, layout=job.layout, mode=job.tiling.mirror, name=job.input_path)
        lo, hi = min(lo, float(raw.min())), max(hi, float(raw.max()))
        below = job.skip.threshold is not None and hi < job.skip.threshold
        if hi > lo and not below:
            return False
    return True
