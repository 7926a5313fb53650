"""End-to-end runs with oracle nets: stitched output must equal factor * input exactly."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from conftest import assert_blended, random_image, write_zarr
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
from unetflow.model.testing import ScaleNetSource
from unetflow.run import segment


def run_oracle(inp, out, source, *, block, patch, blend="gaussian", halo=None, cluster=None, chunk=None, **output):
    config = RunConfig(
        input=inp, output=out, model="(oracle)",
        tiling=TilingSpec(block_shape=block, patch_shape=patch, blend=blend, halo=halo, batch_size=3),
        output_settings=OutputSettings(overwrite=True, chunk_shape=chunk or block, **output),
        cluster=cluster or ClusterSpec(kind="inline"),
    )
    report = segment(config, source=source, progress=False)
    return zarr.open_array(out)[:], report


CASES_3D = [
    # (margin, blend, block, patch, halo)
    (0, "gaussian", (8, 8, 8), (4, 4, 4), None),  # tiny blocks, patches cross every seam
    (0, "gaussian", (19, 33, 17), (7, 9, 5), None),  # one block, odd patch
    (0, "constant", (8, 16, 8), (6, 6, 6), None),
    (0, "crop", (8, 8, 8), (6, 6, 6), (1, 1, 1)),  # halo crop
    (3, "gaussian", (8, 8, 8), (10, 10, 10), None),  # valid-like: overlap-tile
    (3, "gaussian", (16, 16, 16), (12, 16, 10), None),
]


@pytest.mark.parametrize("margin, blend, block, patch, halo", CASES_3D)
def test_x2_oracle_3d_exact(tmp_path, image3d, margin, blend, block, patch, halo):
    inp, data = image3d
    out, report = run_oracle(inp, str(tmp_path / "out.zarr"), ScaleNetSource(factor=2.0, margin=margin), block=block, patch=patch, blend=blend, halo=halo)
    assert out.shape == (1, 19, 33, 17)
    exact = margin > 0 or blend == "crop"  # tile and crop modes copy; blending divides float32 sums
    (np.testing.assert_array_equal if exact else assert_blended)(out[0], 2.0 * data.astype(np.float32))
    assert report.voxels == data.size  # every voxel written once, by exactly one block


@pytest.mark.parametrize("margin, blend, block, patch", [(0, "gaussian", (16, 16), (8, 12)), (2, "gaussian", (8, 24), (9, 9)), (0, "crop", (16, 16), (8, 8))])
def test_identity_oracle_2d_exact(tmp_path, image2d, margin, blend, block, patch):
    inp, data = image2d
    source = ScaleNetSource(factor=1.0, margin=margin, dims=2)
    out, _ = run_oracle(inp, str(tmp_path / "o.zarr"), source, block=block, patch=patch, blend=blend, halo=(1, 1))
    exact = margin > 0 or blend == "crop"
    (np.testing.assert_array_equal if exact else assert_blended)(out[0], data.astype(np.float32))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "int16"])
def test_input_dtypes(tmp_path, dtype):
    data = random_image((9, 20, 11), dtype=dtype)
    inp = write_zarr(tmp_path / "in.zarr", data)
    out, _ = run_oracle(inp, str(tmp_path / "o.zarr"), ScaleNetSource(factor=2.0), block=(8, 8, 8), patch=(4, 4, 4))
    assert_blended(out[0], 2.0 * data.astype(np.float32))


def test_channels_and_zarr_v2_input(tmp_path):
    data = random_image((2, 11, 13), dtype="uint16")
    inp = write_zarr(tmp_path / "in.zarr", data, chunks=(1, 5, 5), zarr_format=2)
    source = ScaleNetSource(factor=2.0, dims=2, channels=2)
    out, _ = run_oracle(inp, str(tmp_path / "o.zarr"), source, block=(8, 8), patch=(4, 4))
    assert_blended(out, 2.0 * data.astype(np.float32))


def test_group_path_and_output_metadata(tmp_path):
    data = random_image((12, 12), dtype="uint8")
    group = zarr.open_group(str(tmp_path / "data.zarr"), mode="w")
    group.create_array("em/raw", data=data, chunks=(4, 4))
    out, report = run_oracle(str(tmp_path / "data.zarr/em/raw"), str(tmp_path / "o.zarr"), ScaleNetSource(dims=2), block=(8, 8), patch=(4, 4), dtype="float16")
    arr = zarr.open_array(str(tmp_path / "o.zarr"))
    assert arr.metadata.zarr_format == 3
    assert tuple(arr.metadata.dimension_names) == ("c", "y", "x")
    assert arr.dtype == np.float16 and arr.chunks == (1, 8, 8)
    meta = arr.attrs["unetflow"]
    assert meta["version"] and meta["config"]["tiling"]["block_shape"] == [8, 8]
    assert "zstd" in repr(arr.compressors).lower()
    np.testing.assert_array_equal(out[0], data.astype(np.float16))


def test_uint8_probabilities_and_labels(tmp_path):
    data = (np.arange(2 * 8 * 8).reshape(2, 8, 8) % 2).astype(np.float32)  # two "class" channels
    inp = write_zarr(tmp_path / "in.zarr", np.stack([data[0], 1 - data[0]]))
    source = ScaleNetSource(dims=2, channels=2)
    out, _ = run_oracle(inp, str(tmp_path / "o.zarr"), source, block=(8, 8), patch=(4, 4), dtype="uint8")
    np.testing.assert_array_equal(out[0], (data[0] * 255).astype(np.uint8))
    labels, _ = run_oracle(inp, str(tmp_path / "l.zarr"), source, block=(8, 8), patch=(4, 4), kind="labels")
    assert labels.dtype == np.uint8 and labels.shape == (8, 8)
    np.testing.assert_array_equal(labels, (data[0] < 0.5).astype(np.uint8))


def test_sharded_output(tmp_path, image3d):
    inp, data = image3d
    config = RunConfig(
        input=inp, output=str(tmp_path / "o.zarr"), model="(oracle)",
        tiling=TilingSpec(block_shape=(16, 16, 16), patch_shape=(4, 4, 4)),
        output_settings=OutputSettings(chunk_shape=(8, 8, 8), shard_shape=(16, 16, 16)),
        cluster=ClusterSpec(kind="inline"),
    )
    segment(config, source=ScaleNetSource(factor=2.0), progress=False)
    arr = zarr.open_array(str(tmp_path / "o.zarr"))
    assert arr.shards == (1, 16, 16, 16) and arr.chunks == (1, 8, 8, 8)
    assert_blended(arr[0], 2.0 * data)


def test_two_worker_local_cluster_equals_inline(tmp_path, image3d):
    inp, data = image3d
    source = ScaleNetSource(factor=2.0, margin=3)
    inline, _ = run_oracle(inp, str(tmp_path / "a.zarr"), source, block=(8, 8, 8), patch=(10, 10, 10))
    dist, report = run_oracle(inp, str(tmp_path / "b.zarr"), source, block=(8, 8, 8), patch=(10, 10, 10), cluster=ClusterSpec(kind="local", workers=2))
    np.testing.assert_array_equal(inline, dist)
    np.testing.assert_array_equal(dist[0], 2.0 * data)
    assert len({r.pid for r in report.results}) == 2  # both workers did blocks
    assert report.blocks_done == 3 * 5 * 3
