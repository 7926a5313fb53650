"""Plans: hand-drawn read/write boxes, coverage, redundancy, refusal of bad shapes."""

from __future__ import annotations

import numpy as np
import pytest

from unetflow.errors import ShapeError
from unetflow.geometry import Box
from unetflow.model.testing import FixedGeometry
from unetflow.plan import Plan, make_tiling

SAME = FixedGeometry("same", input_multiple=1, margin=0, receptive_radius=2)
SAME8 = FixedGeometry("same", input_multiple=8, margin=0, receptive_radius=5)
VALID = FixedGeometry("valid", input_multiple=4, margin=3, receptive_radius=3)


def test_blend_plan_hand_drawn_1d():
    # image 10, patch 4, overlap 0.25 -> step 3, starts 0 3 6; blocks of 5:
    #   |0 1 2 3 4|5 6 7 8 9|
    #    [0 . . .]                 patch 0
    #          [3 . . .]           patch 1 (touches both blocks)
    #                [6 . . .]     patch 2
    tiling = make_tiling(SAME, (4,), blend="gaussian", overlap=0.25)
    plan = Plan((10,), (5,), tiling)
    assert plan.starts == ((0, 3, 6),)
    b0, b1 = plan.blocks()
    assert b0.write_box == Box((0,), (5,)) and b0.read_box == Box((0,), (7,))
    assert list(b0.patches[0]) == [0, 1]
    assert b1.write_box == Box((5,), (5,)) and b1.read_box == Box((3,), (7,))
    assert plan.computed_patches == 4  # patch 1 computed by both blocks
    assert plan.redundancy == pytest.approx(4 * 4 / 10)


def test_tile_plan_hand_drawn_1d():
    # valid net, margin 3, patch 16 -> output 10, step 8 (multiple of 4); image 11, one block
    #   input box of patch k = [8k - 3, 8k + 13); each patch owns the first 8 of its 10 outputs
    tiling = make_tiling(VALID, (16,))
    assert tiling.mode == "tile" and tiling.tile == (8,) and tiling.context == (3,)
    plan = Plan((11,), (16,), tiling)
    (b,) = plan.blocks()
    assert plan.starts == ((0, 8),)
    assert b.read_box == Box((-3,), (24,))


def test_valid_step_snaps_to_input_multiple():
    geo = FixedGeometry("valid", input_multiple=8, margin=2, receptive_radius=2)
    tiling = make_tiling(geo, (16,))  # output 12 -> step 8
    assert tiling.step == (8,) and tiling.tile == (8,)


@pytest.mark.parametrize("blend", ["gaussian", "crop"])
@pytest.mark.parametrize("block", [(4, 4, 4), (8, 16, 8), (5, 7, 3), (64, 64, 64)])
def test_every_voxel_written_once_and_patches_cover(blend, block):
    shape = (19, 33, 17)
    tiling = make_tiling(SAME, (6, 6, 6), blend=blend, halo=(2, 2, 2))
    plan = Plan(shape, block, tiling)
    written = np.zeros(shape, dtype=int)
    for b in plan.blocks():
        written[b.write_box.to_slices()] += 1
        covered = np.zeros(b.write_box.shape, dtype=int)
        for start in plan.patch_tile_starts(b):
            part = Box(start, tiling.tile).intersect(b.write_box)
            covered[part.relative_to(b.write_box).to_slices()] += 1
            assert b.read_box.contains(tiling.input_box(start))
        assert covered.min() >= 1
        if blend == "crop":
            assert covered.max() == 1
    assert written.min() == 1 and written.max() == 1


def test_block_ids_are_row_major_and_stable():
    plan = Plan((19, 33), (8, 8), make_tiling(SAME, (4, 4)))
    assert plan.grid == (3, 5)
    assert plan.block(7).position == (1, 2)
    assert [b.block_id for b in plan.blocks()] == list(range(15))


def test_refuses_bad_patch_sizes():
    with pytest.raises(ShapeError, match="multiple of 8"):
        make_tiling(SAME8, (12, 16))
    with pytest.raises(ShapeError, match="halo"):
        make_tiling(SAME8, (32,), blend="crop", halo=(2,))
    with pytest.warns(UserWarning, match="receptive radius"):
        make_tiling(SAME8, (32,), blend="crop", halo=(2,), allow_small_halo=True)


def test_one_block_has_no_redundancy_beyond_overlap():
    plan = Plan((16, 16), (16, 16), make_tiling(SAME, (8, 8), overlap=0.0))
    assert plan.redundancy == 1.0
