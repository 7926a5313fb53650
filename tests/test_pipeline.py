"""Issue 14: the block on the device (CPU here): conversions, the verdict, the bf16 guard,
the out-of-memory message, dtypes refused before work. No timings asserted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from conftest import random_image, write_zarr
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
from unetflow.errors import ConfigError
from unetflow.job import OutputSpec
from unetflow.values import convert_output
from unetflow.model.predictor import NetInfo, Predictor
from unetflow.model.testing import FixedGeometry, NearFreeSource, ScaleNetSource
from unetflow.resolve import output_spec
from unetflow.run import segment
from unetflow.telemetry import verdict


def _config(tmp_path, inp, name, **output):
    return RunConfig(
        input=inp, output=str(tmp_path / name), model="(oracle)",
        tiling=TilingSpec(block_shape=(16, 16, 16), patch_shape=(8, 8, 8), batch_size=2),
        output_settings=OutputSettings(overwrite=True, chunk_shape=(8, 16, 16), **output),
        cluster=ClusterSpec(kind="inline"),
    )


def test_converted_outputs_equal_the_float32_output_converted_on_the_host(tmp_path):
    """uint8, float16 and labels are converted on the device; the same as converting the
    float32 output with numpy (uint8: x255, rounded half to even, clipped)."""
    data = random_image((24, 20, 16))
    inp = write_zarr(tmp_path / "in.zarr", data)
    segment(_config(tmp_path, inp, "f32.zarr"), source=NearFreeSource(), progress=False)
    f32 = zarr.open_array(str(tmp_path / "f32.zarr"))[:]
    assert f32.shape == (2, 24, 20, 16) and f32.min() < 0.05 and f32.max() > 0.95
    for dtype in ("uint8", "float16"):
        segment(_config(tmp_path, inp, f"{dtype}.zarr", dtype=dtype), source=NearFreeSource(), progress=False)
        got = zarr.open_array(str(tmp_path / f"{dtype}.zarr"))[:]
        want = np.clip(np.rint(f32 * 255.0), 0, 255).astype(np.uint8) if dtype == "uint8" else f32.astype(np.float16)
        np.testing.assert_array_equal(got, want)
    segment(_config(tmp_path, inp, "labels.zarr", kind="labels"), source=NearFreeSource(), progress=False)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "labels.zarr"))[:], f32.argmax(axis=0).astype(np.uint8))


def test_convert_output_matches_numpy():
    values = np.array([[[-0.2, 0.0, 0.5 / 255, 1.5 / 255, 0.3, 1.2]], [[1.2, 1.0, 0.9, 0.1, 0.7, -0.2]]], dtype=np.float32)
    u8, _ = convert_output(values, OutputSpec("probabilities", "uint8"))
    np.testing.assert_array_equal(u8, np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8))
    labels, _ = convert_output(values, OutputSpec("labels", "uint16"))
    assert labels.dtype == np.uint16 and labels.tolist() == values.argmax(0).tolist()


def test_near_free_model_verdict_is_not_model_busy(tmp_path):
    """With a model that does (almost) nothing, the run must not claim the model is busy."""
    inp = write_zarr(tmp_path / "in.zarr", random_image((32, 32, 32)), chunks=(16, 16, 16))
    config = _config(tmp_path, inp, "o.zarr")
    report = segment(config, source=NearFreeSource(), progress=False)
    t = report.telemetry
    assert t["busy"] < 0.5 and "model busy" in t["verdict"] and "bound by" in t["verdict"]
    assert t["bound_by"] != "forward"
    assert t["seconds"]["forward"] < t["seconds"]["wall"]
    assert set(t["per_worker"]) and all("write" in s for s in t["per_worker"].values())


def test_verdict_names_the_bounding_stage():
    v = verdict({"forward": 9.0, "read": 1.0, "write": 2.0}, 10.0, gpu=True)
    assert v.startswith("GPU busy 90%, idle 10%: bound by the forward pass")
    v = verdict({"forward": 1.0, "read": 7.0}, 10.0, gpu=False)
    assert v.startswith("model busy 10%: bound by reading the input") and "storage" in v
    v = verdict({"forward": 4.0, "blend": 1.0}, 2.0, gpu=False, lanes=4)  # four lanes side by side: 1 s each
    assert v.startswith("model busy 50%: bound by the forward pass")


class _BadHalf(nn.Module):
    """Right in float32, wrong under autocast: what a broken bf16 kernel looks like."""

    def __init__(self):
        super().__init__()
        self.dims, self.in_channels, self.classes, self.activation = 3, 1, 2, "softmax"
        self.geometry = FixedGeometry("same")

    def forward(self, x):
        logits = torch.cat([x, -x], dim=1)
        return -logits if torch.is_autocast_enabled("cpu") else logits


class _GoodHalf(_BadHalf):
    def forward(self, x):
        return torch.cat([x, -x], dim=1)


def test_bf16_guard_falls_back_to_float32_once(caplog):
    bad = Predictor(_BadHalf(), device=torch.device("cpu"), amp=True)
    check = bad.check_amp((8, 8, 8))
    assert check["kept"] is False and check["argmax_flips"] > 0.5 and bad.amp is False
    assert "running this model in float32" in caplog.text
    assert bad.check_amp((8, 8, 8)) is check  # once per predictor
    good = Predictor(_GoodHalf(), device=torch.device("cpu"), amp=True)
    assert good.check_amp((8, 8, 8))["kept"] is True and good.amp is True
    assert Predictor(_GoodHalf(), device=torch.device("cpu"), amp=False).check_amp((8, 8, 8)) is None


class _OutOfMemory(_GoodHalf):
    def forward(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_batch_size_and_patch_shape():
    p = Predictor(_OutOfMemory(), device=torch.device("cpu"), amp=False)
    with pytest.raises(ConfigError, match=r"batch of 2 patches of shape \(8, 8, 8\).*--batch-size.*--patch-shape"):
        p.run(torch.zeros((2, 1, 8, 8, 8)))


def test_labels_dtype_too_small_is_refused_before_work():
    info = NetInfo(3, 1, 300, "softmax", FixedGeometry("same"))
    config = RunConfig(input="a", output="b", model="m", output_settings=OutputSettings(kind="labels", dtype="uint8"))
    with pytest.raises(ConfigError, match=r"uint8 cannot hold the labels 0..299.*--dtype uint16"):
        output_spec(config, info)
    assert output_spec(RunConfig(input="a", output="b", model="m", output_settings=OutputSettings(kind="labels")), info).dtype == "uint16"


def test_tiled_equals_one_block_bit_for_bit(tmp_path):
    """Float32 sums in the one global order: block shape does not change a bit."""
    data = random_image((24, 20, 16))
    inp = write_zarr(tmp_path / "in.zarr", data)
    outs = []
    for name, block in (("one.zarr", (24, 24, 16)), ("tiled.zarr", (8, 8, 8))):
        config = RunConfig(
            input=inp, output=str(tmp_path / name), model="(oracle)",
            tiling=TilingSpec(block_shape=block, patch_shape=(6, 7, 5), batch_size=3),
            output_settings=OutputSettings(overwrite=True, chunk_shape=(8, 8, 8)), cluster=ClusterSpec(kind="inline"),
        )
        segment(config, source=ScaleNetSource(factor=2.0), progress=False)
        outs.append(zarr.open_array(str(tmp_path / name))[:])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_uint16_as_int16_bits_normalises_like_uint16():
    """How uint16 rows cross to a GPU (torch's CUDA kernels lack uint16): the same floats."""
    from unetflow.config import NormSpec
    from unetflow.values import normalise_tensor

    raw = np.array([[0, 1, 32767, 32768, 40000, 65535]], dtype=np.uint16)
    norm, stats = NormSpec(kind="percentile"), ((100.0, 60000.0),)
    direct = normalise_tensor(torch.from_numpy(raw), norm, stats)
    bits = normalise_tensor(torch.from_numpy(raw.view(np.int16)), norm, stats, uint16_bits=True)
    assert torch.equal(direct, bits) and float(bits[0, 5]) > 1.0
