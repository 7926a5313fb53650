"""The write-box accumulator and the sliding plane window of the streamed block loop."""

import numpy as np
import pytest

from unetflow.blend import Accumulator, PlaneWindow, window
from unetflow.geometry import Box


def _patches(rng, write_box, tile, n):
    starts = sorted(
        tuple(int(rng.integers(o - t + 1, o + s)) for o, s, t in zip(write_box.offset, write_box.shape, tile)) for _ in range(n)
    )
    return [(Box(s, tile), rng.random((2, *tile)).astype(np.float32)) for s in starts]


@pytest.mark.parametrize("unit", [1, 3, 7])
def test_plane_window_equals_whole_accumulator(unit):
    """Adding patches in axis-0 order and popping finished planes gives the same bytes as one
    accumulator over the whole write box; the buffer never grows."""
    rng = np.random.default_rng(unit)
    w, tile = Box((5, 2, 0), (13, 6, 5)), (4, 3, 5)
    weights = window(tile, "gaussian")
    patches = _patches(rng, w, tile, 60)
    patches += [(Box((z, y, 0), tile), rng.random((2, *tile)).astype(np.float32)) for z in range(2, 18) for y in range(0, 8, 3)]
    patches.sort(key=lambda p: p[0].offset)
    whole = Accumulator(w, 2, weighted=True)
    for box, pred in patches:
        whole.add(pred, box, weights)
    held = PlaneWindow(w, 2, weighted=True, capacity=tile[0] + unit)
    buffer = held._buf.values
    parts = []
    for i, (box, pred) in enumerate(patches):
        held.extend(box.offset[0] + tile[0])
        held.acc.add(pred, box, weights)
        nxt = patches[i + 1][0].offset[0] if i + 1 < len(patches) else w.stop[0]
        done = w.offset[0] + ((min(nxt, w.stop[0]) - w.offset[0]) // unit) * unit if nxt < w.stop[0] else w.stop[0]
        if done > held.start:
            parts.append(held.pop(done - held.start))
    assert held._buf.values is buffer
    assert np.array_equal(np.concatenate(parts, axis=1), whole.result())


def test_plane_window_refuses_overflow():
    held = PlaneWindow(Box((0, 0), (10, 4)), 1, weighted=False, capacity=3)
    held.extend(3)
    with pytest.raises(RuntimeError, match="cannot hold"):
        held.extend(4)


def test_plane_window_unweighted_result_is_a_copy():
    held = PlaneWindow(Box((0, 0), (4, 2)), 1, weighted=False, capacity=4)
    held.extend(4)
    held.acc.add(np.ones((1, 4, 2), np.float32), Box((0, 0), (4, 2)))
    first = held.pop(2)
    assert first.tolist() == [[[1, 1], [1, 1]]] and not np.shares_memory(first, held._buf.values)
