"""The weight window, the separable normaliser and the sliding plane window of the streamed block loop."""

import itertools

import numpy as np
import pytest
import torch

from unetflow.blend import PlaneWindow, axis_weight_sums, window, window_1d
from unetflow.geometry import Box


def _grid(write_box, tile, step):
    """Per axis, starts every *step* from below the box to past it (a product grid, like Plan.starts)."""
    return [list(range(o - t + 1, o + s, st)) for o, s, t, st in zip(write_box.offset, write_box.shape, tile, step)]


def _reference(write_box, tile, starts, preds, kind):
    """Sum of weight * prediction over every patch, divided by the summed weights: float64, patch by patch."""
    w = window(tile, kind).astype(np.float64)
    values = np.zeros((2, *write_box.shape))
    weights = np.zeros(write_box.shape)
    for s, pred in zip(itertools.product(*starts), preds):
        part = Box(s, tile).intersect(write_box)
        if part.is_empty():
            continue
        src, dst = part.relative_to(Box(s, tile)).to_slices(), part.relative_to(write_box).to_slices()
        values[(slice(None), *dst)] += pred[(slice(None), *src)] * w[src]
        weights[dst] += w[src]
    return values / weights


def test_window_is_the_product_of_its_axes():
    w = window((5, 4, 3), "gaussian")
    expect = np.multiply.outer(np.multiply.outer(window_1d(5, "gaussian"), window_1d(4, "gaussian")), window_1d(3, "gaussian"))
    assert w.dtype == np.float32 and w.max() == 1.0 and w.min() > 0
    np.testing.assert_array_equal(w, expect.astype(np.float32))


def test_axis_weight_sums_are_the_summed_weights():
    """The separable normaliser: the product of per-axis sums equals the weights summed patch by patch."""
    box, tile, step = Box((3, 0), (11, 9)), (4, 5), (3, 2)
    starts = _grid(box, tile, step)
    summed = np.zeros(box.shape)
    w = window(tile, "gaussian").astype(np.float64)
    for s in itertools.product(*starts):
        part = Box(s, tile).intersect(box)
        if not part.is_empty():
            summed[part.relative_to(box).to_slices()] += w[part.relative_to(Box(s, tile)).to_slices()]
    product = np.multiply.outer(*(axis_weight_sums(starts[a], tile[a], "gaussian", box.offset[a], box.stop[a]) for a in range(2)))
    np.testing.assert_allclose(product, summed, rtol=1e-6)


@pytest.mark.parametrize("unit", [1, 3, 7, 13])
@pytest.mark.parametrize("kind", ["gaussian", "constant"])
def test_plane_window_equals_the_float64_reference(unit, kind):
    """Adding patches in the global order and popping finished planes in units gives the
    float64 patch-by-patch blend within 1e-6; the buffer never grows."""
    rng = np.random.default_rng(unit)
    w, tile = Box((5, 2, 0), (13, 6, 5)), (4, 3, 5)
    starts = _grid(w, tile, (3, 2, 4))
    boxes = [Box(s, tile) for s in itertools.product(*starts)]
    preds = [rng.random((2, *tile)).astype(np.float32) for _ in boxes]
    held = PlaneWindow(w, 2, tile=tile, starts=starts, kind=kind, unit=unit)
    parts = []
    for i, (box, pred) in enumerate(zip(boxes, preds)):
        held.extend(box.offset[0] + tile[0])
        assert held.stop - held.start <= tile[0] + unit  # the window never grows
        held.add(torch.from_numpy(pred), box)
        nxt = boxes[i + 1].offset[0] if i + 1 < len(boxes) else w.stop[0]
        done = w.offset[0] + ((min(nxt, w.stop[0]) - w.offset[0]) // unit) * unit if nxt < w.stop[0] else w.stop[0]
        if done > held.start:
            for slab in held.pop(done - held.start):
                assert slab.shape[1] == unit or held.start == w.stop[0]
                parts.append(slab.numpy().copy())
                held.recycle(slab)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), _reference(w, tile, starts, preds, kind), rtol=1e-6)


def test_plane_window_refuses_overflow():
    held = PlaneWindow(Box((0, 0), (10, 4)), 1, tile=(1, 4), starts=[range(10), [0]], kind=None, unit=2)
    held.extend(3)
    with pytest.raises(RuntimeError, match="cannot hold"):
        held.extend(4)


def test_plane_window_refuses_a_plan_that_misses_or_doubles_voxels():
    with pytest.raises(RuntimeError, match="no patch covered"):
        PlaneWindow(Box((0, 0), (4, 4)), 1, tile=(2, 4), starts=[[0], [0]], kind="gaussian")
    with pytest.raises(RuntimeError, match="tiles per voxel, not 1"):
        PlaneWindow(Box((0, 0), (4, 4)), 1, tile=(2, 4), starts=[[0, 1, 2], [0]], kind=None)


def test_plane_window_hands_over_whole_slabs():
    """Tiles spanning two slabs land in both; finished planes leave as whole slabs, no copy."""
    held = PlaneWindow(Box((0, 0), (6, 2)), 1, tile=(3, 2), starts=[[0, 3], [0]], kind=None, unit=4)
    held.extend(6)
    held.add(torch.ones((1, 3, 2)), Box((0, 0), (3, 2)))
    held.add(torch.full((1, 3, 2), 3.0), Box((3, 0), (3, 2)))
    with pytest.raises(RuntimeError, match="cannot finish"):
        held.pop(1)  # not a whole slab
    first = held.pop(4)
    assert [s.tolist() for s in first] == [[[[1, 1], [1, 1], [1, 1], [3, 3]]]]
    rest = held.pop(2)  # the rest of the write box: a short slab
    assert [s.tolist() for s in rest] == [[[[3, 3], [3, 3]]]]
