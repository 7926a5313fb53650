"""Shared fixtures: tiny Zarr stores on disk in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import zarr


def write_zarr(path, data, *, chunks=None, zarr_format=3, dimension_names=None):
    """Write *data* to a Zarr array at *path* and return the path as str."""
    chunks = chunks or tuple(min(8, s) for s in data.shape)
    kwargs = {"dimension_names": dimension_names} if dimension_names and zarr_format == 3 else {}
    zarr.create_array(store=str(path), data=data, chunks=chunks, zarr_format=zarr_format, overwrite=True, **kwargs)
    return str(path)


def random_image(shape, dtype="uint16", seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100.0, 20.0, shape).astype(dtype)
    hi = min(np.iinfo(dtype).max, 4000)
    return rng.integers(0, hi, shape).astype(dtype)


@pytest.fixture
def image3d(tmp_path):
    data = random_image((19, 33, 17))
    return write_zarr(tmp_path / "raw.zarr", data), data


@pytest.fixture
def image2d(tmp_path):
    data = random_image((37, 45))
    return write_zarr(tmp_path / "raw2d.zarr", data), data


def pytest_collection_modifyitems(config, items):
    """GPU tests skip without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_blended(actual, expected):
    """A blended (gaussian or constant) output against its oracle (x2 or identity):
    float32 sums in the one global patch order, divided by the summed weights, give the
    oracle back within 1e-6 relative (bit-identical across block shapes and workers;
    tile and crop modes are exact: compare those with assert_array_equal)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=0)
