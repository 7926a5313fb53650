"""Formats: inputs written by other writers (tifffile, h5py, ome-zarr-models), outputs read by
other readers (tensorstore, zarr-python), OME-Zarr validated with ome-zarr-models, S3 on a
loopback moto server."""

from __future__ import annotations

import socket

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from conftest import assert_blended, random_image
from unetflow import formats
from unetflow.cli import main
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
from unetflow.errors import InputFormatError
from unetflow.model.testing import ScaleNetSource
from unetflow.run import segment

ts = pytest.importorskip("tensorstore")
v05 = pytest.importorskip("ome_zarr_models.v05")


def run(inp, out, *, dims=3, level=None, kind="probabilities", cluster=None, block=(8, 32, 32), patch=(4, 8, 8), channels=1):
    config = RunConfig(
        input=str(inp), output=str(out), model="(oracle)", level=level,
        tiling=TilingSpec(block_shape=block[-dims:], patch_shape=patch[-dims:], batch_size=8),
        output_settings=OutputSettings(overwrite=True, kind=kind), cluster=cluster or ClusterSpec(kind="inline"),
    )
    return segment(config, source=ScaleNetSource(factor=2.0, dims=dims, channels=channels), progress=False)


def tensorstore_read(path):
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result().read().result()


def test_ome_tiff_to_ome_zarr(tmp_path):
    data = random_image((5, 2, 70, 66))  # stored Z, C, Y, X (ImageJ-like order): read as (C, Z, Y, X)
    tif = tmp_path / "stack.ome.tif"
    tifffile.imwrite(tif, data, ome=True, bigtiff=True, tile=(32, 32),
                     metadata={"axes": "ZCYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 0.6})
    arr = formats.open_input(tif)
    assert arr.shape == (2, 5, 70, 66) and arr.dimension_names == ("c", "z", "y", "x") and arr.voxel_size == (0.6, 0.5, 0.5)
    assert arr.chunks == (1, 1, 32, 32)  # tiles are chunks: a box reads only its tiles
    out = tmp_path / "pred.ome.zarr"
    run(tif, out, channels=2)
    want = 2.0 * np.moveaxis(data, 1, 0).astype(np.float32)
    assert_blended(tensorstore_read(out / "0"), want)
    image = v05.Image.from_zarr(zarr.open_group(str(out), mode="r"))  # the spec's own validator
    ms = image.ome_attributes.multiscales[0]
    assert [a.name for a in ms.axes] == ["c", "z", "y", "x"] and ms.axes[1].unit == "micrometer"
    assert list(ms.datasets[0].coordinateTransformations[0].scale) == [1.0, 0.6, 0.5, 0.5]
    level1 = zarr.open_array(str(out / "1"), mode="r")
    assert level1.shape == (2, 2, 35, 33)  # z about isotropic: halved too
    np.testing.assert_allclose(level1[0, 0, 0, 0], want[0, :2, :2, :2].mean(), rtol=1e-6)


def test_labels_output_is_an_image_label(tmp_path, image3d):
    inp, data = image3d
    out = tmp_path / "seg.ome.zarr"
    run(inp, out, kind="labels", block=(8, 16, 16))
    root = zarr.open_group(str(out), mode="r")
    v05.Labels.from_zarr(root["labels"])
    label = v05.ImageLabel.from_zarr(root["labels/segmentation"])
    assert [a.name for a in label.ome_attributes.multiscales[0].axes] == ["z", "y", "x"]
    np.testing.assert_array_equal(tensorstore_read(out / "labels/segmentation/0"), np.zeros(data.shape, np.uint8))
    assert formats.open_input(out).shape == data.shape  # an OME-Zarr whose image is its label image opens too


def test_tiff_slices_convert_cli(tmp_path):
    data = random_image((6, 40, 50), dtype="uint8")
    (tmp_path / "slices").mkdir()
    files = []
    for z, plane in enumerate(data):
        files.append(str(tmp_path / "slices" / f"s{z:03d}.tif"))
        tifffile.imwrite(files[-1], plane)
    out = tmp_path / "raw.zarr"
    result = CliRunner().invoke(main, ["convert", *files, str(out), "--chunks", "4,16,16", "--shards", "4,32,32", "--no-progress"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(tensorstore_read(out), data)
    arr = zarr.open_array(str(out), mode="r")
    assert arr.chunks == (4, 16, 16) and arr.shards == (4, 32, 32) and arr.metadata.zarr_format == 3
    glob_in = formats.open_input(str(tmp_path / "slices" / "*.tif"))  # a quoted glob and a folder read the same
    np.testing.assert_array_equal(glob_in[1:3, 5:9], data[1:3, 5:9])
    np.testing.assert_array_equal(formats.open_input(str(tmp_path / "slices"))[:], data)


def test_hdf5_input_on_two_workers(tmp_path):
    data = random_image((19, 33, 17))
    h5 = tmp_path / "em.h5"
    with h5py.File(h5, "w") as f:
        ds = f.create_dataset("volumes/raw", data=data, chunks=(8, 8, 8))
        ds.attrs["resolution"] = [40.0, 4.0, 4.0]
        f.create_dataset("volumes/other", data=np.zeros(3))
    with pytest.raises(InputFormatError, match=r"em.h5:/volumes/"):
        formats.open_input(str(h5))  # two datasets: name one
    arr = formats.open_input(f"{h5}:/volumes/raw")
    assert arr.chunks == (8, 8, 8) and arr.voxel_size == (40.0, 4.0, 4.0) and arr.unit == "nanometer"
    out = tmp_path / "pred.zarr"
    report = run(f"{h5}:/volumes/raw", out, block=(8, 16, 16), cluster=ClusterSpec(kind="local", workers=2))
    assert_blended(zarr.open_array(str(out))[0], 2.0 * data.astype(np.float32))
    assert len({r.pid for r in report.results}) >= 1


def _write_ome_zarr(path, data, *, version):
    """An OME-Zarr (t, c, z, y, x) with two levels, written with ome-zarr-models (not unetflow)."""
    models = pytest.importorskip(f"ome_zarr_models.{version}")
    axes = [models.axes.Axis(name=n, type=t, unit="micrometer" if t == "space" else None)
            for n, t in zip("tczyx", ["time", "channel", "space", "space", "space"])]
    levels = [data, data[:, :, :, ::2, ::2]]
    fmt = 2 if version == "v04" else 3
    specs = [zarr.create_array(store=zarr.storage.MemoryStore(), shape=a.shape, dtype=a.dtype, chunks=(1, 1, 4, 8, 8), zarr_format=fmt) for a in levels]
    if fmt == 3:
        specs = [zarr.create_array(store=zarr.storage.MemoryStore(), shape=a.shape, dtype=a.dtype, chunks=(1, 1, 4, 8, 8),
                                   zarr_format=3, dimension_names=list("tczyx")) for a in levels]
    from pydantic_zarr.v2 import ArraySpec as A2
    from pydantic_zarr.v3 import ArraySpec as A3

    specs = [(A2 if fmt == 2 else A3).from_zarr(s) for s in specs]
    image = models.image.Image.new(array_specs=specs, paths=["0", "1"], axes=axes,
                                   scales=[[1, 1, 2.0, 0.5, 0.5], [1, 1, 2.0, 1.0, 1.0]], translations=[None, None])
    group = image.to_zarr(zarr.storage.LocalStore(str(path)), path="")
    for key, a in zip(["0", "1"], levels):
        group[key][:] = a
    return path


@pytest.mark.parametrize("version", ["v04", "v05"])
def test_ome_zarr_input_at_a_level(tmp_path, version):
    data = random_image((1, 1, 9, 40, 36))
    inp = _write_ome_zarr(tmp_path / "raw.ome.zarr", data, version=version)
    arr = formats.open_input(inp, level=1)
    assert arr.shape == (1, 9, 20, 18) and arr.voxel_size == (2.0, 1.0, 1.0)  # singleton t dropped
    assert arr.dimension_names == ("c", "z", "y", "x")
    out = tmp_path / "pred.ome.zarr"
    run(inp, out, level=1, block=(8, 16, 16))
    assert_blended(zarr.open_array(str(out / "0"))[0], 2.0 * data[0, 0, :, ::2, ::2])
    scale = zarr.open_group(str(out)).attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [1.0, 2.0, 1.0, 1.0]  # the input level's voxel size travels to the output
    with pytest.raises(InputFormatError, match="--level 0..1"):
        formats.open_input(inp, level=5)


@pytest.fixture
def s3_server(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="unetflow-test")
    yield endpoint
    server.stop()


def test_s3_ome_zarr_input_level(tmp_path, s3_server):
    data = random_image((1, 1, 9, 40, 36))
    local = _write_ome_zarr(tmp_path / "raw.ome.zarr", data, version="v05")
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(local), "unetflow-test/raw.ome.zarr", recursive=True)
    url = "s3://unetflow-test/raw.ome.zarr"
    assert formats.open_input(url, level=1).shape == (1, 9, 20, 18)
    out = tmp_path / "pred.ome.zarr"
    run(url, out, level=1, block=(8, 16, 16))
    assert_blended(zarr.open_array(str(out / "0"))[0], 2.0 * data[0, 0, :, ::2, ::2])


def test_preview_png(tmp_path, image3d):
    inp, data = image3d
    out = tmp_path / "pred.ome.zarr"
    run(inp, out, block=(8, 16, 16))
    png = tmp_path / "p.png"
    result = CliRunner().invoke(main, ["preview", str(out), "--z", "4", "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert "over" in result.output  # the input came from the run's attributes
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (17, 33) and im.mode == "RGB"
    result = CliRunner().invoke(main, ["preview", str(out), "--max-projection", "-o", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["preview", str(out), "--z", "99", "-o", str(png)])
    assert result.exit_code == 1 and "--z 99" in result.output


def test_info_and_missing_inputs_cli(tmp_path):
    tif = tmp_path / "x.tif"
    tifffile.imwrite(tif, random_image((4, 20, 20)), photometric="minisblack")
    info = CliRunner().invoke(main, ["info", str(tif), "--json"])
    assert info.exit_code == 0 and '"format": "tiff"' in info.output
    missing = CliRunner().invoke(main, ["convert", str(tmp_path / "no.h5") + ":/raw", str(tmp_path / "o.zarr"), "--no-progress"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
