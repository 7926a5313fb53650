"""Boxes, grids and mirror maps: pure integer code, no I/O, no arrays.

Coordinates are spatial only, in axis order (Z, Y, X) or (Y, X). A :class:`Box` is
half-open: ``offset <= i < offset + shape`` on every axis. The vocabulary of the
block model:

- ``total_box``: the whole image, ``Box((0,) * ndim, image_shape)``.
- ``write_box``: the output region a block owns; write boxes tile the total box.
- ``read_box``: every input voxel the block's patches need; it may reach outside
  the image, where values come from mirroring (:func:`mirror_indices`).
- ``halo``: read box minus write box.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

Shape = tuple[int, ...]


@dataclass(frozen=True, order=True)
class Box:
    """An axis-aligned half-open box ``[offset, offset + shape)``.

    >>> b = Box((2, 3), (4, 5))
    >>> b.stop
    (6, 8)
    >>> b.grow(1).offset, b.grow(1).shape
    ((1, 2), (6, 7))
    >>> b.intersect(Box((0, 0), (3, 4)))
    Box(offset=(2, 3), shape=(1, 1))
    """

    offset: Shape
    shape: Shape

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", tuple(int(v) for v in self.offset))
        object.__setattr__(self, "shape", tuple(max(0, int(v)) for v in self.shape))

    @classmethod
    def from_bounds(cls, start: Sequence[int], stop: Sequence[int]) -> Box:
        return cls(tuple(start), tuple(b - a for a, b in zip(start, stop)))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def stop(self) -> Shape:
        return tuple(o + s for o, s in zip(self.offset, self.shape))

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def is_empty(self) -> bool:
        return self.size == 0

    def grow(self, before: int | Sequence[int], after: int | Sequence[int] | None = None) -> Box:
        """Grow by *before* voxels at the low end and *after* (default: same) at the high end."""
        lo = _per_axis(before, self.ndim)
        hi = lo if after is None else _per_axis(after, self.ndim)
        return Box.from_bounds([o - a for o, a in zip(self.offset, lo)], [s + b for s, b in zip(self.stop, hi)])

    def shift(self, by: Sequence[int]) -> Box:
        return Box(tuple(o + d for o, d in zip(self.offset, by)), self.shape)

    def intersect(self, other: Box) -> Box:
        start = [max(a, b) for a, b in zip(self.offset, other.offset)]
        stop = [min(a, b) for a, b in zip(self.stop, other.stop)]
        return Box.from_bounds(start, [max(a, b) for a, b in zip(start, stop)])

    def contains(self, other: Box) -> bool:
        return all(a <= b for a, b in zip(self.offset, other.offset)) and all(
            a >= b for a, b in zip(self.stop, other.stop)
        )

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of *outer* (whose offset becomes the origin)."""
        return Box(tuple(o - p for o, p in zip(self.offset, outer.offset)), self.shape)

    def to_slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))

    def union(self, other: Box) -> Box:
        """The smallest box holding both."""
        return Box.from_bounds(
            [min(a, b) for a, b in zip(self.offset, other.offset)],
            [max(a, b) for a, b in zip(self.stop, other.stop)],
        )


def _per_axis(value: int | Sequence[int], ndim: int) -> Shape:
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(int(v) for v in value)


def grid_boxes(total_shape: Sequence[int], cell_shape: Sequence[int]) -> Iterator[tuple[Shape, Box]]:
    """Yield ``(grid_position, box)`` for cells of *cell_shape* tiling *total_shape*.

    Cells are anchored at the origin; the last cell on each axis is clipped to the
    image. Cells never overlap and cover every voxel exactly once.

    >>> [(p, b.offset, b.shape) for p, b in grid_boxes((5,), (2,))]
    [((0,), (0,), (2,)), ((1,), (2,), (2,)), ((2,), (4,), (1,))]
    """
    counts = [-(-t // c) for t, c in zip(total_shape, cell_shape)]
    total = Box((0,) * len(total_shape), tuple(total_shape))
    for pos in itertools.product(*(range(n) for n in counts)):
        start = tuple(p * c for p, c in zip(pos, cell_shape))
        yield pos, Box(start, tuple(cell_shape)).intersect(total)


def grid_counts(total_shape: Sequence[int], cell_shape: Sequence[int]) -> Shape:
    """Cells per axis of :func:`grid_boxes`.

    >>> grid_counts((19, 33, 17), (8, 8, 8))
    (3, 5, 3)
    """
    return tuple(-(-t // c) for t, c in zip(total_shape, cell_shape))


def patch_starts(length: int, tile: int, step: int, *, snap_last: bool) -> tuple[int, ...]:
    """Starts, in output coordinates, of the global patch grid along one axis.

    Starts are ``0, step, 2*step, ...``: anchored at the image origin and a function
    of the image length and tiling settings only, never of the block layout. With
    ``snap_last`` (blending) the last tile is moved back to end exactly at the image
    end when the image is at least one tile long; otherwise (tile and crop modes)
    tiles continue until they cover the image and the last one may reach past it.

    ::

        length 10, tile 4, step 3, snap_last=True     length 10, tile 4, step 4
        |0 1 2 3 4 5 6 7 8 9|                          |0 1 2 3 4 5 6 7 8 9|
         [0 . . .]                                      [0 . . .]
               [3 . . .]                                        [4 . . .]
                     [6 . . .]  <- ends at 10                           [8 . . .]  <- reaches 12
                                                                          (output past 10 is dropped)

    >>> patch_starts(10, 4, 3, snap_last=True)
    (0, 3, 6)
    >>> patch_starts(11, 4, 3, snap_last=True)
    (0, 3, 6, 7)
    >>> patch_starts(10, 4, 4, snap_last=False)
    (0, 4, 8)
    >>> patch_starts(3, 4, 4, snap_last=True)
    (0,)
    """
    if length <= tile:
        return (0,)
    if not snap_last:
        return tuple(range(0, length, step))
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return tuple(sorted(set(starts)))


def patch_index_range(starts: Sequence[int], tile: int, lo: int, hi: int) -> range:
    """Indices ``k`` of *starts* whose tile ``[starts[k], starts[k] + tile)`` meets ``[lo, hi)``.

    *starts* must be sorted.

    >>> list(patch_index_range((0, 3, 6), 4, 3, 6))
    [0, 1]
    """
    ks = [k for k, s in enumerate(starts) if s < hi and s + tile > lo]
    return range(ks[0], ks[-1] + 1) if ks else range(0)


def mirror_index(i: int, n: int, mode: str = "reflect") -> int:
    """Map any integer index onto ``[0, n)`` by mirroring at the image border.

    ``reflect`` mirrors about the edge voxel (numpy's ``reflect``: ``... 2 1 | 0 1 2 ...``),
    ``symmetric`` repeats it (numpy's ``symmetric``: ``... 1 0 | 0 1 ...``). Repeats
    as often as needed, so a halo larger than the image is filled as numpy.pad does.

    >>> [mirror_index(i, 4) for i in range(-3, 7)]
    [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    >>> [mirror_index(i, 4, "symmetric") for i in range(-3, 7)]
    [2, 1, 0, 0, 1, 2, 3, 3, 2, 1]
    >>> mirror_index(5, 1)
    0
    """
    if 0 <= i < n:
        return i
    if mode == "reflect":
        if n == 1:
            return 0
        period = 2 * n - 2
        j = i % period
        return j if j < n else period - j
    if mode == "symmetric":
        period = 2 * n
        j = i % period
        return j if j < n else period - 1 - j
    raise ValueError(f"mirror mode {mode!r} is not 'reflect' or 'symmetric'")


def mirror_indices(start: int, stop: int, n: int, mode: str = "reflect") -> list[int]:
    """Source indices in ``[0, n)`` for the positions ``start .. stop - 1``.

    >>> mirror_indices(-2, 3, 5)
    [2, 1, 0, 1, 2]
    """
    return [mirror_index(i, n, mode) for i in range(start, stop)]


class NetGeometry(Protocol):
    """What the plan needs to know of a network's sizes: :class:`unetflow.model.geometry.UNetGeometry`,
    or an oracle net's (``unetflow.model.testing``)."""

    padding: str
    input_multiple: int
    margin: int
    receptive_radius: int

    def output_size(self, n: int) -> int: ...
