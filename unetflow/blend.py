"""Weight windows and the write-box accumulator: pure array code.

A block adds each patch's prediction, restricted to the block's write box, into an
:class:`Accumulator`; :meth:`Accumulator.result` divides by the summed weights. Patches
are added in one fixed global order, so a voxel's value does not depend on which
block computed it.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

from unetflow.geometry import Box


@lru_cache(maxsize=16)
def window(shape: tuple[int, ...], kind: str, sigma_scale: float = 0.125) -> np.ndarray:
    """A separable weight window of *shape*, ndarray float32 with maximum 1.

    ``gaussian`` uses sigma = ``sigma_scale`` * size per axis (MONAI's and nnU-Net's
    default 1/8), floored at 1e-3 so that border voxels of a lone patch still count;
    ``constant`` and ``none`` are all ones.

    >>> window((3,), "constant").tolist()
    [1.0, 1.0, 1.0]
    >>> w = window((5,), "gaussian"); float(w.max()), bool(w[0] < w[2])
    (1.0, True)
    """
    if kind not in ("gaussian", "constant", "none"):
        raise ValueError(f"window kind {kind!r} is not gaussian or constant")
    w = np.ones(shape, dtype=np.float64)
    if kind == "gaussian":
        for axis, n in enumerate(shape):
            x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
            sigma = max(sigma_scale * n, 1e-6)
            g = np.exp(-0.5 * (x / sigma) ** 2)
            view = [1] * len(shape)
            view[axis] = n
            w = w * g.reshape(view)
        w = np.maximum(w / w.max(), 1e-3)
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


SLAB_ELEMENTS = 2**16  # float64 products per slab in Accumulator.add: 512 KiB, cache-sized


class Accumulator:
    """Weighted sum of patch outputs over one write box.

    Parameters
    ----------
    write_box : the region (output coordinates) this accumulator covers.
    channels : output channels K.
    weighted : False for tile and crop modes, where each voxel gets exactly one
        contribution and is copied, not averaged.
    """

    def __init__(self, write_box: Box, channels: int, *, weighted: bool) -> None:
        self.write_box = write_box
        self.weighted = weighted
        # float64 sums: a weighted average of equal values gives that value back exactly
        dtype = np.float64 if weighted else np.float32
        self.values = np.zeros((channels, *write_box.shape), dtype=dtype)
        self.weights = np.zeros(write_box.shape, dtype=np.float64) if weighted else None
        self.hits = None if weighted else np.zeros(write_box.shape, dtype=np.uint8)
        self._scratch_cell: list[np.ndarray] = []  # shared with front() views

    def front(self, n: int, offset: int) -> "Accumulator":
        """The first *n* planes (axis 0) as an accumulator of their own at axis-0 *offset*:
        views, so adding to it adds to this one."""
        view = Accumulator.__new__(Accumulator)
        view.write_box = Box((offset, *self.write_box.offset[1:]), (n, *self.write_box.shape[1:]))
        view.weighted = self.weighted
        view.values = self.values[:, :n]
        view.weights = None if self.weights is None else self.weights[:n]
        view.hits = None if self.hits is None else self.hits[:n]
        view._scratch_cell = self._scratch_cell
        return view

    def add(self, prediction: np.ndarray, tile_box: Box, weights: np.ndarray | None = None) -> None:
        """Add *prediction* (ndarray of shape (K, *tile_box.shape)) located at *tile_box*."""
        part = tile_box.intersect(self.write_box)
        if part.is_empty():
            return
        src = (slice(None),) + part.relative_to(tile_box).to_slices()
        dst = part.relative_to(self.write_box).to_slices()
        if not self.weighted:
            self.values[(slice(None),) + dst] = prediction[src]
            self.hits[dst] += 1
            return
        w = weights[src[1:]]
        if w.dtype != np.float64:
            w = w.astype(np.float64)
        pred = prediction[src]
        values = self.values[(slice(None),) + dst]
        sums = self.weights[dst]
        # slab by slab along the first axis, so that each slab's product stays in the
        # cache between its multiply and its add (one pass over a 4 MiB product went to
        # memory and back: 1.6-2.0 ms per 64^3 patch, 1.1 ms in slabs). Every voxel still
        # gets the same operations in the same order: the same bits.
        planes = max(1, SLAB_ELEMENTS // (values.shape[0] * math.prod(part.shape[1:])))
        product = self._scratch((min(planes, part.shape[0]), *part.shape[1:]))
        for z in range(0, part.shape[0], planes):
            n = min(planes, part.shape[0] - z)
            slab = product[:, :n]
            np.multiply(pred[:, z : z + n], w[z : z + n], out=slab)
            np.add(values[:, z : z + n], slab, out=values[:, z : z + n])
            np.add(sums[z : z + n], w[z : z + n], out=sums[z : z + n])

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 (K, *shape) work array, a view of one buffer that grows to the largest slab."""
        need = (self.values.shape[0], *shape)
        cell = self._scratch_cell
        if not cell or any(n > b for n, b in zip(need, cell[0].shape)):
            have = cell[0].shape if cell else need
            cell[:] = [np.empty(tuple(max(n, b) for n, b in zip(need, have)), np.float64)]
        return cell[0][tuple(slice(0, n) for n in need)]

    def result(self) -> np.ndarray:
        """The blended values, ndarray float32 of shape (K, *write_box.shape).

        Raises
        ------
        RuntimeError
            A voxel received no contribution, or (tile and crop modes) more than one:
            a planning bug, never a user error.
        """
        if not self.weighted:
            if self.hits.min() != 1 or self.hits.max() != 1:
                raise RuntimeError(f"write box {self.write_box} got {self.hits.min()}..{self.hits.max()} tiles per voxel, not 1")
            return self.values
        if self.weights.min() <= 0:
            raise RuntimeError(f"write box {self.write_box} has voxels no patch covered")
        # divided in float64 and rounded once into the float32 result: no float64 temporary
        return np.divide(self.values, self.weights, out=np.empty(self.values.shape, np.float32), casting="same_kind")


@lru_cache(maxsize=16)
def _window64(shape: tuple[int, ...], kind: str) -> np.ndarray:
    out = window(shape, kind).astype(np.float64)
    out.setflags(write=False)
    return out


def tile_weights(tile_shape: Sequence[int], kind: str) -> np.ndarray:
    """The window for one patch tile, in the accumulator's float64 (the float32
    :func:`window`'s values exactly; converted once, not for every patch)."""
    return _window64(tuple(int(s) for s in tile_shape), kind)


class PlaneWindow:
    """A sliding run of axis-0 planes of one write box, in one buffer allocated once.

    The streamed block loop (:func:`unetflow.infer.predict_block_streamed`) holds only
    the planes that open patches still touch: :meth:`extend` opens planes at the end,
    :meth:`pop` finishes planes at the front. The buffer never changes size (planes
    shift down in place, one plane at a time), so a worker's allocator sees the same
    few sizes block after block and its peak memory does not creep up with the
    number of blocks (issue 3).

    *capacity* planes must cover the widest run held at once (tile + flush unit).
    """

    def __init__(self, write_box: Box, channels: int, *, weighted: bool, capacity: int) -> None:
        self.write_box = write_box
        cap = max(1, min(int(capacity), write_box.shape[0]))
        self._buf = Accumulator(Box(write_box.offset, (cap, *write_box.shape[1:])), channels, weighted=weighted)
        self.start = self.stop = write_box.offset[0]

    @property
    def acc(self) -> Accumulator:
        """An :class:`Accumulator` over the planes held now (views into the buffer)."""
        return self._buf.front(self.stop - self.start, self.start)

    def extend(self, stop: int) -> None:
        """Hold planes up to *stop* (clipped to the write box); new planes are empty."""
        stop = min(stop, self.write_box.stop[0])
        if stop - self.start > self._buf.write_box.shape[0]:
            raise RuntimeError(f"plane window of {self._buf.write_box.shape[0]} planes cannot hold {self.start}..{stop}")
        self.stop = max(self.stop, stop)

    def pop(self, n: int) -> np.ndarray:
        """Finish the first *n* held planes: their result (a new array), then forget them.

        The caller guarantees no later patch touches those planes (patches come in the
        global order, axis 0 outermost).
        """
        held = self.stop - self.start
        out = self._buf.front(n, self.start).result()
        if np.shares_memory(out, self._buf.values):  # tile/crop modes return the sums themselves
            out = out.copy()
        self._shift(n, held)
        self.start += n
        return out

    def _shift(self, n: int, held: int) -> None:
        b = self._buf
        counts = b.weights if b.weighted else b.hits
        for i in range(held - n):  # plane by plane: source and target never overlap
            b.values[:, i] = b.values[:, n + i]
            counts[i] = counts[n + i]
        b.values[:, held - n : held] = 0
        counts[held - n : held] = 0
