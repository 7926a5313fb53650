"""GPU runs (skipped without CUDA): same results as the CPU, one pinned worker per GPU."""

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

pytestmark = pytest.mark.gpu


def _run(tmp_path, name, *, device, amp, cluster):
    data = (random_image((24, 40, 40), dtype="float32") - 100.0) / 20.0
    inp = write_zarr(tmp_path / "in.zarr", data)
    torch.manual_seed(0)
    model = str(tmp_path / "m.pt")
    save_checkpoint(model, UNet(ModelSpec(dims=3, depth=2, width=4, norm=NormSpec(kind="none"))))
    config = RunConfig(
        input=inp, output=str(tmp_path / f"{name}.zarr"), model=model,
        tiling=TilingSpec(block_shape=(16, 16, 16), patch_shape=(16, 16, 16)),
        output_settings=OutputSettings(chunk_shape=(16, 16, 16), overwrite=True),
        cluster=cluster, device=device, amp=amp,
    )
    segment(config, progress=False)
    return zarr.open_array(str(tmp_path / f"{name}.zarr"))[:]


def test_gpu_fp32_matches_cpu_and_bf16_is_close(tmp_path):
    cpu = _run(tmp_path, "cpu", device="cpu", amp=False, cluster=ClusterSpec(kind="inline"))
    gpu = _run(tmp_path, "gpu", device="cuda", amp=False, cluster=ClusterSpec(kind="inline"))
    bf16 = _run(tmp_path, "bf16", device="cuda", amp=True, cluster=ClusterSpec(kind="inline"))
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
    np.testing.assert_allclose(bf16, cpu, atol=5e-2)


def test_one_pinned_worker_per_gpu(tmp_path):
    cpu = _run(tmp_path, "cpu", device="cpu", amp=False, cluster=ClusterSpec(kind="inline"))
    gpus = _run(tmp_path, "gpus", device="auto", amp=False, cluster=ClusterSpec(kind="local", gpus=torch.cuda.device_count()))
    np.testing.assert_allclose(gpus, cpu, atol=1e-4)


def _oracle_run(tmp_path, name, data, source, *, device, block=(16, 16, 16), **output):
    inp = write_zarr(tmp_path / f"in-{name}.zarr", data)
    config = RunConfig(
        input=inp, output=str(tmp_path / f"{name}.zarr"), model="(oracle)",
        tiling=TilingSpec(block_shape=block, patch_shape=(8, 8, 8), batch_size=3),
        output_settings=OutputSettings(chunk_shape=(8, 16, 16), overwrite=True, **output),
        cluster=ClusterSpec(kind="inline"), device=device, amp=False,
    )
    report = segment(config, source=source, progress=False)
    return zarr.open_array(str(tmp_path / f"{name}.zarr"))[:], report


def test_uint16_crosses_as_int16_bits_exactly(tmp_path):
    """Raw uint16 rows go to the GPU as int16 bits: values above 32767 must survive."""
    from unetflow.model.testing import ScaleNetSource

    data = np.random.default_rng(0).integers(0, 65536, (24, 20, 16)).astype(np.uint16)
    gpu, _ = _oracle_run(tmp_path, "gpu", data, ScaleNetSource(factor=1.0, margin=1), device="cuda")
    np.testing.assert_array_equal(gpu[0], data.astype(np.float32))  # valid-like net: tiles copied, exact


def test_device_conversions_equal_the_cpu(tmp_path):
    """uint8, labels and blending on the GPU give the CPU's bytes (same ops, fp32)."""
    from unetflow.model.testing import NearFreeSource

    data = random_image((24, 20, 16))
    for kind, dtype in (("probabilities", "uint8"), ("labels", None), ("probabilities", "float32")):
        cpu, _ = _oracle_run(tmp_path, f"c-{kind}-{dtype}", data, NearFreeSource(), device="cpu", kind=kind, dtype=dtype)
        gpu, report = _oracle_run(tmp_path, f"g-{kind}-{dtype}", data, NearFreeSource(), device="cuda", kind=kind, dtype=dtype)
        if dtype == "float32":
            np.testing.assert_allclose(gpu, cpu, rtol=1e-6, atol=1e-7)
        else:
            assert (gpu != cpu).mean() < 1e-3  # a value exactly on a rounding or argmax tie may differ
        assert report.telemetry["verdict"].startswith("GPU busy") and report.telemetry["busy"] < 0.5


def test_gpu_tiled_equals_one_block_bit_for_bit(tmp_path):
    from unetflow.model.testing import ScaleNetSource

    data = random_image((24, 20, 16))
    one, _ = _oracle_run(tmp_path, "one", data, ScaleNetSource(factor=2.0), device="cuda", block=(24, 32, 16))
    tiled, report = _oracle_run(tmp_path, "tiled", data, ScaleNetSource(factor=2.0), device="cuda", block=(8, 16, 16))
    np.testing.assert_array_equal(one, tiled)
    np.testing.assert_allclose(one[0], 2.0 * data.astype(np.float32), rtol=1e-6)
    assert all(r.peak_device_memory > 0 for r in report.results)


def test_bf16_guard_on_the_gpu():
    from unetflow.model.predictor import Predictor

    torch.manual_seed(0)
    net = UNet(ModelSpec(dims=3, depth=2, width=8, classes=3))
    check = Predictor(net, device=torch.device("cuda"), amp=True).check_amp((32, 32, 32))
    assert check is not None and check["dtype"] in ("bfloat16", "float16") and "kept" in check
