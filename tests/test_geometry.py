"""Boxes, grids, patch starts and mirror maps against hand-drawn cases."""

from __future__ import annotations


import numpy as np
import pytest

from unetflow.geometry import Box, grid_boxes, grid_counts, mirror_indices, patch_index_range, patch_starts


def test_box_arithmetic():
    b = Box((2, 3), (4, 5))
    assert b.stop == (6, 8)
    assert b.grow(1) == Box((1, 2), (6, 7))
    assert b.grow((1, 0), (0, 2)) == Box((1, 3), (5, 7))
    assert b.intersect(Box((5, 0), (10, 4))) == Box((5, 3), (1, 1))
    assert b.intersect(Box((10, 10), (1, 1))).is_empty()
    assert Box((0, 0), (10, 10)).contains(b)
    assert b.relative_to(Box((1, 1), (9, 9))) == Box((1, 2), (4, 5))
    assert b.to_slices() == (slice(2, 6), slice(3, 8))


@pytest.mark.parametrize(
    "total, cell",
    [
        ((19, 33, 17), (8, 8, 8)),  # odd shape no cell divides
        ((5,), (2,)),
        ((7, 3), (7, 3)),  # one cell exactly
        ((4, 4), (9, 9)),  # cell larger than image
    ],
)
def test_grid_covers_every_voxel_exactly_once(total, cell):
    hits = np.zeros(total, dtype=int)
    boxes = list(grid_boxes(total, cell))
    assert len(boxes) == np.prod(grid_counts(total, cell))
    for _, box in boxes:
        hits[box.to_slices()] += 1
    assert hits.min() == 1 and hits.max() == 1


@pytest.mark.parametrize(
    "length, tile, step, snap, expected",
    [
        (10, 4, 3, True, (0, 3, 6)),  # last tile ends exactly at 10
        (11, 4, 3, True, (0, 3, 6, 7)),  # last snapped back to 11 - 4
        (10, 4, 4, False, (0, 4, 8)),  # overlap-tile: last reaches 12, output past 10 dropped
        (3, 4, 4, True, (0,)),  # image shorter than a tile
        (8, 8, 8, False, (0,)),
        (9, 8, 8, False, (0, 8)),
    ],
)
def test_patch_starts_table(length, tile, step, snap, expected):
    assert patch_starts(length, tile, step, snap_last=snap) == expected


def test_patch_index_range():
    starts = (0, 3, 6)
    assert list(patch_index_range(starts, 4, 0, 1)) == [0]
    assert list(patch_index_range(starts, 4, 3, 4)) == [0, 1]
    assert list(patch_index_range(starts, 4, 9, 10)) == [2]


@pytest.mark.parametrize("mode", ["reflect", "symmetric"])
@pytest.mark.parametrize("n, before, after", [(5, 3, 2), (4, 9, 7), (1, 2, 3), (2, 5, 5)])
def test_mirror_matches_numpy_pad(mode, n, before, after):
    data = np.arange(n)
    expected = np.pad(data, (before, after), mode=mode)
    assert mirror_indices(-before, n + after, n, mode) == expected.tolist()


def test_pad_then_crop_round_trip():
    data = np.arange(7)
    idx = mirror_indices(-3, 10, 7)
    assert np.array_equal(data[idx][3:-3], data)
