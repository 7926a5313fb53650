"""Real U-Nets through the block engine: tiled == whole image, independent of blocks and workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from conftest import random_image, write_zarr
from unetflow.config import ClusterSpec, ModelSpec, NormSpec, OutputSettings, RunConfig, TilingSpec
from unetflow.model.checkpoint import save_checkpoint
from unetflow.model.unet import UNet
from unetflow.run import segment


def make_checkpoint(path, **spec):
    torch.manual_seed(0)
    net = UNet(ModelSpec(norm=NormSpec(kind="none"), **spec))
    save_checkpoint(path, net)
    return str(path), net


def run(inp, out, model, *, block, patch, cluster=None, blend="gaussian", halo=None):
    config = RunConfig(
        input=inp, output=out, model=model,
        tiling=TilingSpec(block_shape=block, patch_shape=patch, blend=blend, halo=halo, batch_size=2),
        output_settings=OutputSettings(chunk_shape=tuple(min(8, b) for b in block)),
        cluster=cluster or ClusterSpec(kind="inline"),
    )
    segment(config, progress=False)
    return zarr.open_array(out)[:]


def whole_image_pass(net, data):
    """One forward pass over the whole image, mirror-padded by the margin and up to a valid size."""
    geo = net.geometry
    pads = []
    for n in data.shape:
        size = geo.valid_input_at_least(n)
        pads.append((geo.margin, size - n - geo.margin))
    padded = np.pad(data.astype(np.float32), pads, mode="reflect")
    with torch.no_grad():
        out = torch.softmax(net(torch.from_numpy(padded)[None, None]), dim=1)[0].numpy()
    return out[(slice(None),) + tuple(slice(0, n) for n in data.shape)]


@pytest.mark.parametrize("dims, shape, blocks, patch", [
    (2, (37, 45), [(8, 8), (16, 24), (64, 64)], (52, 48)),
    (3, (19, 33, 17), [(8, 16, 8)], (48, 52, 48)),
])
def test_valid_unet_tiled_equals_whole_image(tmp_path, dims, shape, blocks, patch):
    data = (random_image(shape, dtype="float32") - 100.0) / 20.0
    inp = write_zarr(tmp_path / "in.zarr", data)
    model, net = make_checkpoint(tmp_path / "m.pt", dims=dims, padding="valid", depth=2, width=4)
    expected = whole_image_pass(net, data)
    for i, block in enumerate(blocks):
        got = run(inp, str(tmp_path / f"o{i}.zarr"), model, block=block, patch=patch)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)  # float rounding only


def test_same_unet_gaussian_independent_of_blocks_and_workers(tmp_path):
    data = (random_image((19, 33, 17), dtype="float32") - 100.0) / 20.0
    inp = write_zarr(tmp_path / "in.zarr", data)
    model, _ = make_checkpoint(tmp_path / "m.pt", dims=3, padding="same", depth=2, width=4)
    one = run(inp, str(tmp_path / "one.zarr"), model, block=(24, 40, 24), patch=(8, 12, 8))
    many = run(inp, str(tmp_path / "many.zarr"), model, block=(8, 8, 8), patch=(8, 12, 8))
    two = run(inp, str(tmp_path / "two.zarr"), model, block=(8, 8, 8), patch=(8, 12, 8), cluster=ClusterSpec(kind="local", workers=2))
    np.testing.assert_allclose(many, one, rtol=0, atol=1e-6)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    assert one.shape == (2, 19, 33, 17)


def test_same_unet_crop_with_full_halo_equals_whole_image(tmp_path):
    data = (random_image((30, 33), dtype="float32") - 100.0) / 20.0
    inp = write_zarr(tmp_path / "in.zarr", data)
    model, net = make_checkpoint(tmp_path / "m.pt", dims=2, padding="same", depth=1, width=4)
    r = net.geometry.receptive_radius
    m = net.geometry.input_multiple
    got = run(inp, str(tmp_path / "o.zarr"), model, block=(8, 8), patch=(2 * r + 8,) * 2, blend="crop", halo=(r, r))
    many = run(inp, str(tmp_path / "p.zarr"), model, block=(16, 40), patch=(2 * r + 16,) * 2, blend="crop", halo=(r, r))
    # one pass over the image mirrored by r on each side (and up to a multiple of 2**depth);
    # the image origin sits at offset r, in pooling phase with the tiles (which start at k*step - r)
    pads = [(r, r + (-(n + 2 * r)) % m) for n in data.shape]
    padded = np.pad(data, pads, mode="reflect")
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(padded)[None, None]), 1)[0].numpy()
    ref = ref[:, r : r + 30, r : r + 33]
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(many, ref, rtol=0, atol=2e-6)


def test_tta_averages_the_flips_and_stays_independent_of_blocks(tmp_path):
    # Predictor level, an exact oracle: flip(conv_k(flip(x))) = conv_flip(k)(x) for a zero-padded
    # convolution, so the TTA of conv_k is the convolution with k averaged over the 4 flips
    from unetflow.model.predictor import Predictor, flip_sets
    from unetflow.model.testing import FixedGeometry

    class Conv(torch.nn.Module):
        dims, in_channels, classes, activation = 2, 1, 1, "none"
        geometry = FixedGeometry("same")

        def __init__(self, kernel):
            super().__init__()
            self.kernel = kernel

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.kernel, padding=2)

    kernel = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 1, 16, 12, generator=torch.Generator().manual_seed(1))
    sym = sum(torch.flip(kernel, a) if a else kernel for a in flip_sets(2)) / 4
    got = Predictor(Conv(kernel), device=torch.device("cpu"), amp=False, tta=True).run(x)
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, sym, padding=2), rtol=0, atol=1e-5)
    plain = Predictor(Conv(kernel), device=torch.device("cpu"), amp=False).run(x)
    assert (plain - got).abs().max() > 0.1
    # through the engine: a real U-Net with --tta, tiny blocks == one block (one global patch order)
    data = (random_image((19, 33, 17), dtype="float32") - 100.0) / 20.0
    inp = write_zarr(tmp_path / "in.zarr", data)
    model, _ = make_checkpoint(tmp_path / "m.pt", dims=3, padding="same", depth=2, width=4)

    def run_tta(out, block, tta=True):
        config = RunConfig(input=inp, output=str(tmp_path / out), model=model,
                           tiling=TilingSpec(block_shape=block, patch_shape=(8, 12, 8), batch_size=2, tta=tta),
                           output_settings=OutputSettings(chunk_shape=(8, 8, 8)), cluster=ClusterSpec(kind="inline"))
        segment(config, progress=False)
        return zarr.open_array(str(tmp_path / out))[:]

    one, many = run_tta("one.zarr", (24, 40, 24)), run_tta("many.zarr", (8, 8, 8))
    np.testing.assert_array_equal(many, one)
    assert np.abs(one - run_tta("plain.zarr", (24, 40, 24), tta=False)).max() > 1e-4
