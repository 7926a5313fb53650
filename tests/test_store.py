"""Store: opening inputs, mirrored reads, bad input messages, output refusal."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from conftest import random_image, write_zarr
from unetflow import formats, store
from unetflow.errors import ConfigError, InputFormatError, InputNotFoundError, OutputExistsError, ShapeError
from unetflow.geometry import Box


@pytest.mark.parametrize("mode", ["reflect", "symmetric"])
@pytest.mark.parametrize("box", [Box((-3, -4), (12, 20)), Box((2, 3), (4, 4)), Box((-9, -9), (30, 30)), Box((5, 8), (9, 9))])
def test_read_box_equals_numpy_pad(tmp_path, mode, box):
    data = random_image((7, 11))
    arr = zarr.open_array(write_zarr(tmp_path / "a.zarr", data, chunks=(3, 4)))
    layout = store.layout_for(arr, 2, name="a")
    before = [max(0, -o) for o in box.offset]
    after = [max(0, s - n) for s, n in zip(box.stop, data.shape)]
    padded = np.pad(data, list(zip(before, after)), mode=mode)
    shifted = box.shift(before)
    got = store.read_box(arr, box, layout=layout, mode=mode)
    np.testing.assert_array_equal(got[0], padded[shifted.to_slices()])


def test_layout_from_dimension_names(tmp_path):
    arr = zarr.open_array(write_zarr(tmp_path / "a.zarr", np.zeros((3, 5, 6), "u1"), dimension_names=("c", "y", "x")))
    assert store.layout_for(arr, 2, name="a") == store.Layout(True, 3, (5, 6))
    arr3 = zarr.open_array(write_zarr(tmp_path / "b.zarr", np.zeros((3, 5, 6), "u1")))
    assert store.layout_for(arr3, 3, name="b") == store.Layout(False, 1, (3, 5, 6))


def test_wrong_dimension_count(tmp_path):
    arr = zarr.open_array(write_zarr(tmp_path / "a.zarr", np.zeros((2, 3, 5, 6), "u1")))
    with pytest.raises(ShapeError, match=r"has 4 axes .* 2-D"):
        store.layout_for(arr, 2, name="a.zarr")


def test_missing_and_not_zarr_and_group(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        formats.open_input(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputFormatError, match="not a Zarr array"):
        formats.open_input(tmp_path / "plain")
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("raw", shape=(4, 4), dtype="u1")
    with pytest.raises(InputFormatError, match=r"is a Zarr group.*g.zarr/raw"):
        formats.open_input(tmp_path / "g.zarr")


def test_corrupt_chunk_names_box(tmp_path):
    path = write_zarr(tmp_path / "a.zarr", random_image((10, 10)), chunks=(5, 5))
    (tmp_path / "a.zarr" / "c" / "0" / "1").write_bytes(b"garbage" * 3)
    arr = formats.open_input(path)
    layout = store.layout_for(arr, 2, name=path)
    store.read_box(arr, Box((0, 0), (5, 5)), layout=layout)  # an intact chunk still reads
    with pytest.raises(InputFormatError, match="does not decode"):
        store.read_box(arr, Box((0, 0), (10, 10)), layout=layout, name=path)


def test_existing_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "o.zarr"
    write_zarr(out, np.ones((4, 4), "u1"))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        store.create_output(out, shape=(4, 4), chunks=(2, 2), dtype="uint8")
    assert zarr.open_array(str(out))[:].sum() == 16  # untouched
    # issue 15: --overwrite removes only what unetflow wrote (here a scratch array) or an empty folder
    with pytest.raises(OutputExistsError, match=r"o.zarr exists and is a Zarr store that unetflow did not write"):
        store.create_output(out, shape=(4, 4), chunks=(2, 2), dtype="uint8", overwrite=True)
    assert zarr.open_array(str(out))[:].sum() == 16  # untouched
    mine = tmp_path / "mine.zarr"
    array = store.create_output(mine, shape=(4, 4), chunks=(2, 2), dtype="uint8", attributes={"unetflow": {"scratch_of": "x"}})
    store.write_box(array, Box((0, 0), (4, 4)), np.ones((4, 4), "u1"), channel_axis=False)
    store.create_output(mine, shape=(4, 4), chunks=(2, 2), dtype="uint8", overwrite=True, kinds=("scratch",))
    assert zarr.open_array(str(mine))[:].sum() == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    store.create_output(empty, shape=(4, 4), chunks=(2, 2), dtype="uint8", overwrite=True)


@pytest.mark.parametrize("output, other, relation", [
    ("in.zarr", "in.zarr", "is"),
    ("in.zarr/pred.zarr", "in.zarr", "lies inside"),
    ("data", "data/in.zarr/raw", "contains"),
    ("link.zarr", "in.zarr", "is"),  # a symlink to the input
    ("data/x.h5.zarr", "data/x.h5:/raw", ""),  # a sibling of the HDF5 file: fine
    ("x.zarr", "x.h5:/raw", ""),
    ("in.zarr2", "in.zarr", ""),  # a shared prefix is not containment
])
def test_output_apart_from_input(tmp_path, monkeypatch, output, other, relation):
    """Issue 15: the output may not be the input, lie inside it or contain it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.zarr").mkdir()
    (tmp_path / "link.zarr").symlink_to(tmp_path / "in.zarr")
    if not relation:
        store.check_apart(output, [("input", other)])
        return
    with pytest.raises(ConfigError, match=f"output {output} {relation} the input {other}"):
        store.check_apart(output, [("input", other)])


def test_urls_compare_normalised():
    with pytest.raises(ConfigError, match="is the input"):
        store.check_apart("S3://bucket/raw.zarr", [("input", "s3://bucket/raw.zarr/")])
    store.check_apart("s3://bucket/pred.zarr", [("input", "s3://bucket/raw.zarr")])


def test_describe(tmp_path):
    path = write_zarr(tmp_path / "a.zarr", np.zeros((6, 8), "u2"), chunks=(3, 4), dimension_names=("y", "x"))
    info = formats.describe(path)
    assert info["shape"] == [6, 8] and info["chunks"] == [3, 4] and info["dtype"] == "uint16"
    assert info["dimension_names"] == ["y", "x"] and info["zarr_format"] == 3 and info["codecs"]


def test_sample_voxels_is_bounded(tmp_path):
    data = random_image((40, 40))
    arr = formats.open_input(write_zarr(tmp_path / "a.zarr", data, chunks=(4, 4)))
    sample = store.sample_voxels(arr, layout=store.layout_for(arr, 2, name="a"), max_chunks=10)
    assert sample.shape == (1, 160)


def test_sample_voxels_thins_large_chunks(tmp_path):
    data = np.arange(64 * 64, dtype="u2").reshape(64, 64)
    arr = formats.open_input(write_zarr(tmp_path / "a.zarr", data, chunks=(32, 32)))
    layout = store.layout_for(arr, 2, name="a")
    sample = store.sample_voxels(arr, layout=layout, max_voxels=1000)
    assert sample.shape[1] <= 1000
    first = data[:32, :32].ravel()
    assert np.array_equal(sample[0, : len(first[::5])], first[::5])  # 4 chunks x 1024 voxels / 1000 -> stride 5
    assert store.sample_voxels(arr, layout=layout).shape == (1, 64 * 64)  # under the budget: every voxel


def test_read_box_wholly_outside_the_image_is_mirrored(tmp_path):
    """A box entirely in the mirrored margin reads reversed planes, not the planes it maps onto in order."""
    data = np.arange(30, dtype="uint16").reshape(30, 1)
    arr = zarr.open_array(write_zarr(tmp_path / "a.zarr", data))
    layout = store.layout_for(arr, 2, name="a")
    got = store.read_box(arr, Box((-8, 0), (8, 1)), layout=layout)
    assert got[0, :, 0].tolist() == [8, 7, 6, 5, 4, 3, 2, 1]
    whole = store.read_box(arr, Box((-9, 0), (26, 1)), layout=layout)
    assert np.array_equal(whole[:, 1:9], got)
