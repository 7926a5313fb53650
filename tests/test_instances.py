"""Blockwise instance labelling equals the whole-image labelling up to renumbering."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from conftest import write_zarr
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
from unetflow.label import grow, label_whole, merge_table
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


@pytest.mark.parametrize("shape, block, cluster", [
    ((19, 40, 33), (8, 8, 8), ClusterSpec(kind="inline")),
    ((64, 70), (16, 16), ClusterSpec(kind="inline")),
    ((19, 40, 33), (8, 16, 8), ClusterSpec(kind="local", workers=2)),
])
def test_blockwise_instances_equal_whole_image(tmp_path, shape, block, cluster):
    _, truth = make_sample(shape, seed=3)
    classes = instance_to_classes(truth)
    inp = write_zarr(tmp_path / "in.zarr", one_hot(classes), chunks=(3, *block))
    config = RunConfig(
        input=inp, output=str(tmp_path / "inst.zarr"), model="(oracle)",
        tiling=TilingSpec(block_shape=block, patch_shape=tuple(min(8, b) for b in block)),
        output_settings=OutputSettings(kind="instances", chunk_shape=block), cluster=cluster,
    )
    segment(config, source=ScaleNetSource(dims=len(shape), channels=3), progress=False)
    got = zarr.open_array(str(tmp_path / "inst.zarr"))[:]
    assert got.dtype == np.uint64
    expected = label_whole(classes)
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
