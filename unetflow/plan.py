"""What to compute: the global patch grid and the blocks, from image meta and settings.

No I/O and no arrays: a :class:`Plan` is a few integers per axis, and blocks are
derived on demand, so a plan for a terabyte volume is as small as one for a toy.

Three tilings, all on one global patch grid anchored at the image origin:

``tile``  (``valid`` nets, the paper's overlap-tile)
    The net turns a patch of input shape P into an output of shape T = P - 2*margin.
    Patch starts are spaced by S, the largest multiple of ``2**depth`` that is <= T,
    and each patch owns the first S voxels of its output. Spacing by a multiple of
    ``2**depth`` keeps the pooling grid of every patch in phase with a single pass
    over the whole mirror-padded image, so the stitched result equals that pass
    exactly. (Spacing by T, as in the paper, would put neighbouring tiles out of
    phase, and the result would depend on the tiling.)
``crop``  (``same`` nets, halo crop)
    A patch of shape P keeps its centre, ``halo`` voxels in from each side; the same
    spacing rule applies. Exact when ``halo`` >= the receptive radius.
``blend`` (``same`` nets)
    Patches of shape P, step S = P - overlap, the last one snapped to the image end;
    each voxel is the weighted average (gaussian or constant window) of every patch
    that covers it, summed in one fixed global order.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator, Sequence

from unetflow.config import Blend
from unetflow.errors import ShapeError
from unetflow.geometry import Box, NetGeometry, Shape, grid_counts, patch_index_range, patch_starts

__all__ = ["NetGeometry"]  # re-exported: the plan is where it is used


@dataclass(frozen=True)
class Tiling:
    """The global patch grid, in numbers per axis.

    Attributes
    ----------
    mode : ``tile``, ``crop`` or ``blend``.
    patch : input shape fed to the net.
    tile : output extent each patch contributes (owns, in tile and crop modes).
    step : distance between patch starts.
    context : input voxels before the tile start (input box = tile box shifted back).
    out_offset : where the tile starts inside the net's output.
    window : ``gaussian``, ``constant`` (blend) or ``none``.
    """

    mode: str
    patch: Shape
    tile: Shape
    step: Shape
    context: Shape
    out_offset: Shape
    window: str = "none"

    @property
    def snap_last(self) -> bool:
        return self.mode == "blend"

    def input_box(self, tile_start: Sequence[int]) -> Box:
        """The input box of the patch whose tile starts at *tile_start*."""
        return Box(tuple(s - c for s, c in zip(tile_start, self.context)), self.patch)


def make_tiling(
    net: NetGeometry,
    patch: Sequence[int],
    *,
    blend: Blend = "gaussian",
    overlap: float = 0.25,
    halo: Sequence[int] | None = None,
    allow_small_halo: bool = False,
) -> Tiling:
    """Choose the tiling for *net* and an input *patch* shape; refuse what cannot work.

    Raises
    ------
    ShapeError
        The patch is not an input size the net takes, or leaves no room for a tile.
    """
    patch = tuple(int(p) for p in patch)
    for p in patch:
        net.output_size(p)  # raises a ShapeError naming the nearest valid sizes
    if net.padding == "valid":
        return _tile_tiling(net, patch)
    if blend == "crop":  # blend and overlap were checked once, by config.TilingSpec
        return _crop_tiling(net, patch, halo, allow_small_halo)
    step = tuple(max(1, p - int(round(p * overlap))) for p in patch)
    return Tiling("blend", patch, patch, step, (0,) * len(patch), (0,) * len(patch), blend)


def _aligned_step(tile: int, multiple: int, *, what: str) -> int:
    step = (tile // multiple) * multiple
    if step < 1:
        raise ShapeError(f"{what} {tile} is smaller than the net's input multiple {multiple}; use a larger --patch-shape")
    return step


def _tile_tiling(net: NetGeometry, patch: Shape) -> Tiling:
    tile = tuple(net.output_size(p) for p in patch)
    step = tuple(_aligned_step(t, net.input_multiple, what="valid output tile") for t in tile)
    margin = (net.margin,) * len(patch)
    return Tiling("tile", patch, step, step, margin, (0,) * len(patch))


def _crop_tiling(net: NetGeometry, patch: Shape, halo: Sequence[int] | None, allow_small: bool) -> Tiling:
    radius = net.receptive_radius
    halo = tuple(halo) if halo is not None else tuple(min(radius, (p - 1) // 2) for p in patch)
    if any(h < radius for h in halo):
        msg = (
            f"halo {halo} is smaller than the net's receptive radius {radius}: crop-mode tiles would not match "
            f"a whole-image pass; use --halo {radius} with a --patch-shape larger than {2 * radius}, or --blend gaussian"
        )
        if not allow_small:
            raise ShapeError(msg + " (or --allow-small-halo to accept seams)")
        warnings.warn(msg, stacklevel=2)
    inner = tuple(p - 2 * h for p, h in zip(patch, halo))
    step = tuple(_aligned_step(t, net.input_multiple, what="crop tile (patch - 2*halo)") for t in inner)
    return Tiling("crop", patch, step, step, halo, halo)


@dataclass(frozen=True)
class Block:
    """One unit of work: a write box it owns and the read box its patches need.

    ``patches`` holds, per axis, the indices into the plan's patch starts; the block
    computes their product in lexicographic (global) order.
    """

    block_id: int
    position: Shape
    write_box: Box
    read_box: Box
    patches: tuple[range, ...]

    @property
    def n_patches(self) -> int:
        return math.prod(len(r) for r in self.patches)


@dataclass(frozen=True)
class Plan:
    """Blocks and patches for one image: ``image_shape`` and ``block_shape`` are spatial."""

    image_shape: Shape
    block_shape: Shape
    tiling: Tiling

    def __post_init__(self) -> None:
        if len(self.block_shape) != len(self.image_shape):
            raise ShapeError(f"block shape {self.block_shape} does not have {len(self.image_shape)} axes like the image")

    @cached_property
    def starts(self) -> tuple[tuple[int, ...], ...]:
        """Per axis, the tile starts of the global patch grid (output coordinates)."""
        t = self.tiling
        return tuple(
            patch_starts(n, tile, step, snap_last=t.snap_last) for n, tile, step in zip(self.image_shape, t.tile, t.step)
        )

    @property
    def grid(self) -> Shape:
        return grid_counts(self.image_shape, self.block_shape)

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def total_box(self) -> Box:
        return Box((0,) * len(self.image_shape), self.image_shape)

    def _axis_patches(self, axis: int, position: int) -> range:
        lo = position * self.block_shape[axis]
        hi = min(lo + self.block_shape[axis], self.image_shape[axis])
        return patch_index_range(self.starts[axis], self.tiling.tile[axis], lo, hi)

    def block(self, block_id: int) -> Block:
        """The block with this id (row-major over the block grid)."""
        position = _unravel(block_id, self.grid)
        write = Box(tuple(p * b for p, b in zip(position, self.block_shape)), self.block_shape).intersect(self.total_box)
        patches = tuple(self._axis_patches(a, p) for a, p in enumerate(position))
        t = self.tiling
        lo = [self.starts[a][r[0]] - t.context[a] for a, r in enumerate(patches)]
        hi = [self.starts[a][r[-1]] - t.context[a] + t.patch[a] for a, r in enumerate(patches)]
        return Block(block_id, position, write, Box.from_bounds(lo, hi), patches)

    def blocks(self) -> Iterator[Block]:
        for block_id in range(self.n_blocks):
            yield self.block(block_id)

    def patch_tile_starts(self, block: Block) -> Iterator[Shape]:
        """Tile starts of the block's patches, in the one global order."""
        axes = [[self.starts[a][k] for k in r] for a, r in enumerate(block.patches)]
        return itertools.product(*axes)

    @cached_property
    def computed_patches(self) -> int:
        """Patches computed by all blocks together (a patch on a block border counts once per block)."""
        per_axis = [
            sum(len(self._axis_patches(a, p)) for p in range(g)) for a, g in enumerate(self.grid)
        ]
        return math.prod(per_axis)

    @property
    def redundancy(self) -> float:
        """Computed input voxels / output voxels: the price of the block and patch shapes."""
        return self.computed_patches * math.prod(self.tiling.patch) / max(1, math.prod(self.image_shape))

    def max_read_shape(self) -> Shape:
        """The largest read box shape over all blocks, per axis."""
        out = []
        for a, g in enumerate(self.grid):
            out.append(max(self._span(a, p) for p in range(g)))
        return tuple(out)

    def _span(self, axis: int, position: int) -> int:
        r = self._axis_patches(axis, position)
        return self.starts[axis][r[-1]] - self.starts[axis][r[0]] + self.tiling.patch[axis]

    def summary(self) -> dict[str, Any]:
        t = self.tiling
        return {
            "image_shape": list(self.image_shape),
            "block_shape": list(self.block_shape),
            "block_grid": list(self.grid),
            "blocks": self.n_blocks,
            "tiling": t.mode,
            "window": t.window,
            "patch_shape": list(t.patch),
            "tile_shape": list(t.tile),
            "patch_step": list(t.step),
            "context": list(t.context),
            "patches_total": self.computed_patches,
            "patches_global": math.prod(len(s) for s in self.starts),
            "max_read_shape": list(self.max_read_shape()),
            "redundancy": round(self.redundancy, 4),
        }


def _unravel(index: int, counts: Sequence[int]) -> Shape:
    if not 0 <= index < math.prod(counts):
        raise IndexError(f"block id {index} is outside 0..{math.prod(counts) - 1}")
    pos = []
    for c in reversed(counts):
        index, r = divmod(index, c)
        pos.append(r)
    return tuple(reversed(pos))
