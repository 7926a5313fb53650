"""Blockwise instance labelling equals the whole-image labelling up to renumbering."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from conftest import write_zarr
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
from unetflow.label import BORDER_CLASS, INTERIOR, grow, instance_classes, label_whole, merge_table
from unetflow.model.testing import ScaleNetSource
from unetflow.run import segment
from unetflow.sample import make_sample
from unetflow.train.targets import instance_to_classes


def same_up_to_renumbering(a, b):
    """True when a bijection between the ids of a and b maps one onto the other (0 <-> 0)."""
    if ((a == 0) != (b == 0)).any():
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def one_hot(classes, k=3):
    return np.stack([(classes == i).astype(np.float32) for i in range(k)])


def soft_probabilities(classes, seed=0):
    """Probabilities whose argmax is *classes*, with interior confidence 0.5..0.95 (never near the 0.6 threshold)."""
    rng = np.random.default_rng(seed)
    top = np.where(classes == INTERIOR, rng.choice([0.5, 0.7, 0.9, 0.95], classes.shape), 0.9).astype(np.float32)
    rest = (1 - top) / 2
    return np.stack([np.where(classes == i, top, rest) for i in range(3)]).astype(np.float32)


@pytest.mark.parametrize("shape, block, cluster, soft", [
    ((19, 40, 33), (8, 8, 8), ClusterSpec(kind="inline"), False),
    ((19, 40, 33), (8, 8, 8), ClusterSpec(kind="inline"), True),
    ((64, 70), (16, 16), ClusterSpec(kind="inline"), True),
    ((19, 40, 33), (8, 16, 8), ClusterSpec(kind="local", workers=2), True),
])
def test_blockwise_instances_equal_whole_image(tmp_path, shape, block, cluster, soft):
    _, truth = make_sample(shape, seed=3)
    classes = instance_to_classes(truth)
    probs = soft_probabilities(classes) if soft else one_hot(classes)
    if soft:  # the interior threshold changes the classes: the test covers step 0 too
        assert (instance_classes(probs) != classes).any()
    else:
        classes = instance_classes(probs)
        np.testing.assert_array_equal(classes, instance_to_classes(truth))  # one-hot: the classes themselves
    inp = write_zarr(tmp_path / "in.zarr", probs, chunks=(3, *block))
    config = RunConfig(
        input=inp, output=str(tmp_path / "inst.zarr"), model="(oracle)",
        tiling=TilingSpec(block_shape=block, patch_shape=tuple(min(8, b) for b in block)),
        output_settings=OutputSettings(kind="instances", chunk_shape=block), cluster=cluster,
    )
    segment(config, source=ScaleNetSource(dims=len(shape), channels=3), progress=False)
    got = zarr.open_array(str(tmp_path / "inst.zarr"))[:]
    assert got.dtype == np.uint64
    expected = label_whole(instance_classes(probs))
    # objects straddle the seams: many more local pieces than objects
    n_seams = sum(s // b for s, b in zip(shape, block))
    assert n_seams > 3 and expected.max() > 5
    assert same_up_to_renumbering(got, expected)
    assert not (tmp_path / "inst.zarr.instances-scratch").exists()


def test_merge_table_chains_and_consecutive_ids():
    table = merge_table(6, np.array([[1, 3], [3, 5], [2, 6]]))
    assert table.tolist() == [0, 1, 2, 1, 3, 1, 2]


def test_grow_tie_break_is_geometric():
    labels = np.array([[0, 0, 0], [7, 0, 9], [0, 0, 0]], dtype=np.uint64)
    fg = np.ones((3, 3), bool)
    once = grow(labels, fg, 1)
    assert once[1, 1] == 7  # -x neighbour comes before +x, whatever the ids
    assert grow(labels * 0 + np.where(labels == 7, 9, np.where(labels == 9, 7, 0)).astype(np.uint64), fg, 1)[1, 1] == 9


def test_weak_interior_bridge_does_not_merge_touching_objects():
    # two 5x5 objects side by side (x 1..5 and 6..10): interior, a border seam of 2
    # voxels, but the model is unsure at the seam (interior 0.55 > border 0.35): the
    # argmax has one interior component; confident interior gives two, grown back
    classes = np.zeros((7, 12), dtype=np.uint8)
    classes[1:6, 1:11] = BORDER_CLASS
    classes[2:5, 2:5] = INTERIOR
    classes[2:5, 7:10] = INTERIOR
    probs = one_hot(classes) * 0.9 + 0.05
    probs[:, 2:5, 5:7] = np.array([0.1, 0.55, 0.35])[:, None, None]  # the bridge, below the 0.6 threshold
    assert label_whole(probs.argmax(axis=0)).max() == 1  # merged
    labels = label_whole(instance_classes(probs))
    assert labels.max() == 2
    assert set(np.unique(labels[:, :6])) == {0, 1} and set(np.unique(labels[:, 6:])) == {0, 2}
    np.testing.assert_array_equal(labels != 0, classes != 0)  # every foreground voxel grown back
    # threshold 0 is the plain argmax
    np.testing.assert_array_equal(instance_classes(probs, 0.0), probs.argmax(axis=0))


def test_interior_threshold_setting_reaches_the_blocks():
    from unetflow.config import OutputSettings, run_config_from_mapping
    from unetflow.errors import ConfigError
    from unetflow.label import INTERIOR_THRESHOLD
    from unetflow.resolve import output_spec

    def spec(**kw):
        return output_spec(RunConfig(input="in.zarr", output="out.zarr", model="m.pt", output_settings=OutputSettings(kind="instances", **kw)), None)

    assert spec().interior_threshold == INTERIOR_THRESHOLD == 0.6
    assert spec(interior_threshold=0.0).interior_threshold == 0.0
    mapped = run_config_from_mapping({"output": {"kind": "instances", "interior_threshold": 0.75}}, input="a", output="b", model="c")
    assert output_spec(mapped, None).interior_threshold == 0.75
    with pytest.raises(ConfigError, match="interior threshold"):
        OutputSettings(kind="instances", interior_threshold=1.0)


def _grow_reference(labels, foreground, steps):
    """The rule's growth written plainly: every step, each unlabelled foreground voxel takes
    its first labelled face neighbour of the previous step, in the order -z, +z, -y, +y, -x, +x."""
    out = labels.copy()
    for _ in range(steps):
        prev = np.pad(out, 1)
        new = out.copy()
        for index in zip(*np.nonzero((out == 0) & foreground)):
            at = tuple(i + 1 for i in index)
            for axis in range(labels.ndim):
                for shift in (-1, 1):
                    near = list(at)
                    near[axis] += shift
                    if new[index] == 0 and prev[tuple(near)] != 0:
                        new[index] = prev[tuple(near)]
        out = new
    return out


@pytest.mark.parametrize("shape, steps", [((19, 33, 17), 9), ((19, 33, 17), 2), ((40, 37), 9), ((7,), 3)])
def test_grow_matches_the_plain_rule(shape, steps):
    from unetflow.label import grow

    rng = np.random.default_rng(len(shape) + steps)
    labels = np.where(rng.random(shape) < 0.03, rng.integers(1, 6, shape), 0).astype(np.uint64)
    foreground = (rng.random(shape) < 0.7) | (labels != 0)
    before = labels.copy()
    np.testing.assert_array_equal(grow(labels, foreground, steps), _grow_reference(labels, foreground, steps))
    np.testing.assert_array_equal(labels, before)  # the input is not changed in place
