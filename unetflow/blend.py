"""Weight windows and the held planes of a block: array code on the block's device.

A block adds each patch's prediction, restricted to the block's write box, into a
:class:`PlaneWindow`: float32 sums in torch tensors on the predictor's device (the
GPU's memory on a GPU, plain memory on the CPU: one implementation). Patches are added
in one fixed global order, so a voxel's value does not depend on which block computed it.

The weights are never summed per patch, and finished planes are never divided. The
window is a product of 1-D windows and the patch grid a product of 1-D grids
(:attr:`unetflow.plan.Plan.starts`), so the sum of the weights of every patch over a
voxel is the product of per-axis sums (:func:`axis_weight_sums`), and each patch can be
added with its window already divided by them: per axis ``w(t) / sum(s + t)`` in float64,
multiplied out and rounded once to float32 (:class:`NormalisedWindows`). Inside the
image those are the same for every patch (the grid is regular), so a block needs only a
handful of them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from unetflow.geometry import Box

FLOOR = 1e-3  # per axis: the border voxels of a lone patch still count


@lru_cache(maxsize=64)
def window_1d(n: int, kind: str, sigma_scale: float = 0.125) -> np.ndarray:
    """The 1-D factor of :func:`window` along an axis of *n* voxels, float64, maximum 1.

    >>> window_1d(3, "constant").tolist()
    [1.0, 1.0, 1.0]
    >>> w = window_1d(5, "gaussian"); float(w.max()), bool(w[0] < w[2])
    (1.0, True)
    """
    if kind not in ("gaussian", "constant", "none"):
        raise ValueError(f"window kind {kind!r} is not gaussian or constant")
    if kind != "gaussian":
        out = np.ones(n, dtype=np.float64)
    else:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        g = np.exp(-0.5 * (x / max(sigma_scale * n, 1e-6)) ** 2)
        out = np.maximum(g / g.max(), FLOOR)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=16)
def window(shape: tuple[int, ...], kind: str, sigma_scale: float = 0.125) -> np.ndarray:
    """A separable weight window of *shape*, ndarray float32 with maximum 1.

    ``gaussian``: per axis a gaussian of sigma = ``sigma_scale`` * size (MONAI's and
    nnU-Net's default 1/8), floored at :data:`FLOOR` so that the border voxels of a lone
    patch still count; ``constant`` and ``none``: all ones. The product of the
    :func:`window_1d` factors, rounded once to float32.
    """
    w = np.ones((), dtype=np.float64)
    for n in shape:
        w = np.multiply.outer(w, window_1d(int(n), kind, sigma_scale))
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


def axis_weight_sums(starts: Sequence[int], tile: int, kind: str, lo: int, hi: int) -> np.ndarray:
    """Per voxel ``lo..hi`` of one axis: the summed 1-D window of every tile at *starts*
    (float64). With ``constant`` weights, the number of tiles covering the voxel.

    >>> axis_weight_sums([0, 2], 3, "constant", 0, 5).tolist()
    [1.0, 1.0, 2.0, 1.0, 1.0]
    """
    w = window_1d(tile, kind)
    out = np.zeros(hi - lo, dtype=np.float64)
    for s in starts:
        a, b = max(s, lo), min(s + tile, hi)
        if a < b:
            out[a - lo : b - lo] += w[a - s : b - s]
    return out


class NormalisedWindows:
    """The window of each patch divided by the summed weights at the voxels it covers.

    Per axis, a tile at start *s* gets ``w(t) / S(s + t)`` (:func:`window_1d` over
    :func:`axis_weight_sums` of the global grid, float64); a patch's window is the
    product over its axes, rounded once to float32 and kept on *device*. Tiles whose
    1-D factors are equal share them, so a block builds a few windows, each once.
    """

    def __init__(self, tile: Sequence[int], starts: Sequence[Sequence[int]], kind: str, device: torch.device) -> None:
        self.device = device
        self._axes: list[dict[int, int]] = []  # per axis: start -> id of its 1-D factor
        self._factors: list[list[torch.Tensor]] = []
        for t, axis_starts in zip(tile, starts):
            lo, hi = min(axis_starts), max(axis_starts) + t
            sums = axis_weight_sums(axis_starts, t, kind, lo, hi)
            w = window_1d(t, kind)
            ids: dict[bytes, int] = {}
            of_start: dict[int, int] = {}
            factors: list[np.ndarray] = []
            for s in axis_starts:
                f = w / sums[s - lo : s - lo + t]
                key = f.tobytes()
                if key not in ids:
                    ids[key] = len(factors)
                    factors.append(f)
                of_start[s] = ids[key]
            self._axes.append(of_start)
            self._factors.append([torch.from_numpy(f).to(device) for f in factors])
        self._windows: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, tile_start: Sequence[int]) -> torch.Tensor:
        """The normalised float32 window of the tile at *tile_start* (a global grid start)."""
        key = tuple(axis[s] for axis, s in zip(self._axes, tile_start))
        out = self._windows.get(key)
        if out is None:
            out = self._factors[0][key[0]]
            for factors, k in zip(self._factors[1:], key[1:]):
                out = out.unsqueeze(-1) * factors[k]  # float64 outer products, one rounding at the end
            out = self._windows[key] = out.to(torch.float32)
        return out


class TensorPool:
    """Tensors kept for reuse, a few per shape and dtype, across flushes and blocks.

    On a CPU a fresh buffer costs its page faults again (a 512x512 plane of two
    channels is 2 MiB), so up to *keep* free ones per kind (shape, dtype) are kept, for
    the *kinds* most recent kinds. On a GPU torch's caching allocator already reuses
    memory, so :meth:`take` simply allocates and :meth:`give` drops. Thread-safe:
    writer threads hand buffers back once written.
    """

    def __init__(self, keep: int, kinds: int = 4) -> None:
        self.keep, self.kinds = keep, kinds
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
             zero: bool = False) -> torch.Tensor:
        device = torch.device(device)
        if device.type == "cpu":
            with self._lock:
                free = self._free.get((tuple(shape), dtype))
                t = free.pop() if free else None
            if t is not None:
                return t.zero_() if zero else t
        return (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)

    def give(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu":
            return
        with self._lock:
            free = self._free.setdefault((tuple(t.shape), t.dtype), [])
            if len(free) < self.keep:
                free.append(t)
            while len(self._free) > self.kinds:  # other block shapes came and went: keep the latest kinds only
                del self._free[next(iter(self._free))]


SLABS = TensorPool(keep=8, kinds=3)  # the float32 sums of PlaneWindow



class PlaneWindow:
    """A sliding run of axis-0 planes of one write box: float32 sums on *device*.

    The streamed block loop (:func:`unetflow.infer.stream_block`) holds only the planes
    that open patches still touch: :meth:`extend` opens planes at the end, :meth:`add`
    adds a patch, :meth:`pop` hands finished planes over. Planes are stored in slabs of
    *unit* planes (the flush unit: an output chunk deep), aligned to the write box, so
    finished planes leave as whole slabs: nothing is copied or shifted, and a slab comes
    back (:meth:`recycle`, from :data:`SLABS`) once its planes are written. Memory is a
    few slabs, whatever the block's depth and however many blocks a worker runs.

    Parameters
    ----------
    write_box : the region (output coordinates) this window covers.
    channels : output channels K.
    tile : the output tile of one patch.
    starts : the global grid's tile starts per axis (:attr:`Plan.starts`).
    kind : ``gaussian`` or ``constant`` (blended: each patch weighted by its
        :class:`NormalisedWindows` window, so the sums are the result), or ``None`` for
        tile and crop modes, where each voxel gets exactly one tile (copied).
    unit : planes per slab (0: the whole write box); pops are whole slabs.
    device : where the sums live.

    Raises
    ------
    RuntimeError
        A voxel of the write box gets no tile, or (tile and crop modes) more than one:
        a planning bug, never a user error.
    """

    def __init__(self, write_box: Box, channels: int, *, tile: Sequence[int], starts: Sequence[Sequence[int]],
                 kind: str | None, unit: int = 0, device: torch.device | str = "cpu") -> None:
        self.write_box = write_box
        self.channels = channels
        self.tile = tuple(int(t) for t in tile)
        self.device = torch.device(device)
        self.weighted = kind is not None
        self.unit = min(unit or write_box.shape[0], write_box.shape[0])
        self.capacity = self.tile[0] + self.unit  # planes held at once, at most
        self.start = self.stop = write_box.offset[0]
        self._slabs: list[torch.Tensor] = []  # covering [start, start + len * unit), the last one maybe short
        counts = [axis_weight_sums(starts[a], self.tile[a], "constant", write_box.offset[a], write_box.stop[a])
                  for a in range(len(self.tile))]
        if any(c.min() <= 0 for c in counts):
            raise RuntimeError(f"write box {write_box} has voxels no patch covered")
        if not self.weighted and any(c.max() != 1 for c in counts):
            raise RuntimeError(f"write box {write_box} gets up to {math.prod(int(c.max()) for c in counts)} tiles per voxel, not 1")
        self._windows = NormalisedWindows(self.tile, starts, kind, self.device) if kind is not None else None

    def extend(self, stop: int) -> None:
        """Hold planes up to *stop* (clipped to the write box); new planes are zero."""
        stop = min(stop, self.write_box.stop[0])
        if stop - self.start > self.capacity:
            raise RuntimeError(f"plane window of {self.capacity} planes cannot hold {self.start}..{stop}")
        self.stop = max(self.stop, stop)
        end = self.write_box.stop[0]
        while self.start + len(self._slabs) * self.unit < self.stop:
            z = self.start + len(self._slabs) * self.unit
            shape = (self.channels, min(self.unit, end - z), *self.write_box.shape[1:])
            self._slabs.append(SLABS.take(shape, torch.float32, self.device, zero=True))

    def add(self, prediction: torch.Tensor, tile_box: Box) -> None:
        """Add *prediction* (tensor (K, *tile_box.shape) on the device) of the global grid's
        tile at *tile_box*; the tile must lie in the held planes (or outside the write box)."""
        held = Box((self.start, *self.write_box.offset[1:]), (self.stop - self.start, *self.write_box.shape[1:]))
        part = tile_box.intersect(held)
        if part.is_empty():
            return
        if self.start > self.write_box.offset[0] and tile_box.offset[0] < self.start:
            raise RuntimeError(f"tile {tile_box} reaches planes below {self.start}, finished already")
        rest = part.relative_to(self.write_box).to_slices()[1:]
        src = part.relative_to(tile_box).to_slices()
        weights = self._windows(tile_box.offset)[src] if self._windows is not None else None
        pred = prediction[(slice(None), *src)]
        z, t0 = part.offset[0], part.offset[0]
        while z < part.stop[0]:  # the slabs the part spans
            k = (z - self.start) // self.unit
            s0 = self.start + k * self.unit
            z1 = min(part.stop[0], s0 + self.unit)
            dst = self._slabs[k][(slice(None), slice(z - s0, z1 - s0), *rest)]
            sub = slice(z - t0, z1 - t0)
            if weights is not None:
                # one fused multiply-add per voxel (the same in every block: the same tile, window and order)
                dst.addcmul_(pred[:, sub], weights[sub])
            else:
                dst.copy_(pred[:, sub])
            z = z1

    def pop(self, n: int) -> list[torch.Tensor]:
        """Finish the first *n* held planes (whole slabs, or the rest of the write box):
        their slabs, in order, each (K, s, ...) float32 final values. The caller owns
        them and hands each back with :meth:`recycle` when done. The caller guarantees
        no later patch touches those planes (patches come in the global order, axis 0
        outermost)."""
        held = self.stop - self.start
        if not 0 < n <= held or (n % self.unit and self.start + n != self.write_box.stop[0]):
            raise RuntimeError(f"cannot finish {n} of the {held} held planes in slabs of {self.unit}")
        k = -(-n // self.unit)
        out, self._slabs = self._slabs[:k], self._slabs[k:]
        self.start += n
        return out

    @staticmethod
    def recycle(slab: torch.Tensor) -> None:
        """A slab from :meth:`pop` is no longer needed (written, or converted)."""
        SLABS.give(slab)
