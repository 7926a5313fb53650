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
