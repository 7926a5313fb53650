"""The benchmarked methods. Each runs in its own process (``python bench/run.py _one``)
and returns seconds, voxels and peak RSS; the model and input come from files so every
method sees the same net, the same Zarr input and the same patch settings.

``floor``        forward passes only, over the global patch grid once, batched, data in memory.
``monai``        ``monai.inferers.sliding_window_inference`` as documented: Zarr -> tensor -> Zarr.
``map_overlap``  ``dask.array.from_zarr`` -> ``map_overlap(boundary='reflect')`` calling the
                 model per chunk -> ``to_zarr``.
``unetflow``     ``unetflow.run.segment``, Zarr to Zarr, on a local Dask cluster of N workers.

The end-to-end methods (all but the floor) are timed from loading the model to the
written output, the input statistics included.
"""

from __future__ import annotations

import itertools
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Case:
    """One benchmark input and its settings (all methods share them)."""

    input: str
    output: str
    model: str
    patch: int = 64
    overlap: float = 0.25
    batch_size: int = 0  # 0: unetflow's own choice for the device
    workers: int = 1
    device: str = "cpu"
    amp: bool = False
    chunk: int = 64
    threads: int = 0  # torch threads in this process; 0: torch's default (all cores)
    lanes: int = 0  # floor: run batches side by side in this many threads, one torch thread each
    inline: bool = False  # unetflow: run blocks in this process (--workers 0), no Dask
    processes: bool | None = None  # unetflow: --processes / --threads (None: its default)
    tuning: bool = False  # unetflow: --tuning (unetflow.tuning: allocator, gc, Dask housekeeping)


def set_threads(case: Case) -> None:
    if case.threads > 0:
        torch.set_num_threads(case.threads)


def peak_rss() -> int:
    from unetflow.memory import peak_rss as vm_hwm

    return vm_hwm()


def load_net(case: Case) -> Any:
    from unetflow.model.checkpoint import load_checkpoint

    return load_checkpoint(case.model).net.to(case.device).eval()


def batch_size(case: Case) -> int:
    if case.batch_size:
        return case.batch_size
    return 1 if case.device == "cpu" else 8


def stats(case: Case) -> tuple[float, float]:
    """The percentile statistics unetflow measures, so every method normalises alike."""
    from unetflow import formats, store
    from unetflow.values import norm_stats
    from unetflow.model.checkpoint import load_checkpoint

    array = formats.open_input(case.input)
    layout = store.layout_for(array, 3, name=case.input)
    norm = load_checkpoint(case.model).net.spec.norm
    (lo, hi), = norm_stats(store.sample_voxels(array, layout=layout), norm)
    return lo, hi


def _normalised(case: Case) -> np.ndarray:
    import zarr

    lo, hi = stats(case)
    data = zarr.open_array(case.input, mode="r")[:].astype(np.float32)
    return (data - lo) / max(hi - lo, 1e-6)


def run_floor(case: Case) -> dict[str, Any]:
    """Forward passes over exactly the patches of the global grid, batched, in memory."""
    from unetflow.geometry import Box
    from unetflow.plan import Plan, make_tiling

    set_threads(case)
    net = load_net(case)
    image = _normalised(case)
    tiling = make_tiling(net.geometry, (case.patch,) * 3, blend="gaussian", overlap=case.overlap)
    plan = Plan(image.shape, image.shape, tiling)
    starts = list(itertools.product(*plan.starts))
    patches = [image[Box(s, tiling.patch).to_slices()] for s in starts]
    b = batch_size(case)
    batches = [torch.from_numpy(np.stack(patches[i : i + b])[:, None]) for i in range(0, len(patches), b)]
    dtype = torch.bfloat16 if case.amp else torch.float32

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode(), torch.autocast(case.device, dtype=dtype, enabled=case.amp):
            net(x.to(case.device, non_blocking=True))

    forward(batches[0])  # warm-up, not timed
    _sync(case)
    t0 = time.perf_counter()
    if case.lanes > 1:
        from concurrent.futures import ThreadPoolExecutor

        torch.set_num_threads(1)
        with ThreadPoolExecutor(case.lanes) as pool:
            list(pool.map(forward, batches))
    else:
        for x in batches:
            forward(x)
    _sync(case)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "voxels": image.size, "patches": len(starts), "batch_size": b, "peak_rss": peak_rss(),
            "threads": torch.get_num_threads(), "lanes": case.lanes}


def _sync(case: Case) -> None:
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()


def _write_output(path: str, probs: np.ndarray, chunk: int) -> None:
    import zarr

    shutil.rmtree(path, ignore_errors=True)
    zarr.create_array(
        store=path, data=probs, chunks=(probs.shape[0], chunk, chunk, chunk),
        compressors=zarr.codecs.ZstdCodec(level=3), zarr_format=3,
    )


def run_monai(case: Case) -> dict[str, Any]:
    """MONAI's documented usage: read the volume, sliding_window_inference, write."""
    from monai.inferers import sliding_window_inference

    set_threads(case)
    t0 = time.perf_counter()  # end to end, as unetflow is timed: model, statistics, Zarr in, Zarr out
    net = load_net(case)
    image = _normalised(case)
    x = torch.from_numpy(image)[None, None].to(case.device)
    dtype = torch.bfloat16 if case.amp else torch.float32
    with torch.inference_mode(), torch.autocast(case.device, dtype=dtype, enabled=case.amp):
        logits = sliding_window_inference(
            x, roi_size=(case.patch,) * 3, sw_batch_size=batch_size(case), predictor=net,
            overlap=case.overlap, mode="gaussian",
        )
    probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
    _write_output(case.output, probs, case.chunk)
    return {"seconds": time.perf_counter() - t0, "voxels": image.size, "peak_rss": peak_rss()}


def run_map_overlap(case: Case, *, chunk: int | None = None, halo: int | None = None) -> dict[str, Any]:
    """A plain dask pipeline: from_zarr, map_overlap calling the model per chunk, to_zarr.

    Default (equal settings): chunks of the patch step (48) with a halo of half the
    overlap (8) per side, so each call sees exactly one 64^3 patch and the calls sit
    48 apart like the blend grid (no blending: the halo is cut off). ``map_overlap_z64``
    keeps the input's 64^3 Zarr chunks and a 16 halo (96^3 per call).
    """
    import dask.array as da
    import zarr

    set_threads(case)
    t0 = time.perf_counter()  # end to end, as unetflow is timed: model, statistics, Zarr in, Zarr out
    net = load_net(case)
    lo, hi = stats(case)
    step = case.patch - int(round(case.patch * case.overlap))
    chunk = chunk or step
    halo = halo if halo is not None else (case.patch - step) // 2

    def predict(block: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(((block.astype(np.float32) - lo) / max(hi - lo, 1e-6)))[None, None]
        with torch.inference_mode():
            y = torch.softmax(net(x.to(case.device)).float(), dim=1)[0].cpu().numpy()
        inner = tuple(slice(halo, n - halo) for n in block.shape)
        return y[(slice(None),) + inner]

    x = da.from_zarr(case.input, chunks=chunk)
    classes = net.spec.classes
    out = da.map_overlap(
        predict, x, depth=halo, boundary="reflect", trim=False, dtype=np.float32,
        new_axis=0, chunks=((classes,),) + x.chunks,
    )
    shutil.rmtree(case.output, ignore_errors=True)
    target = zarr.create_array(
        store=case.output, shape=(classes, *x.shape), chunks=(classes, case.chunk, case.chunk, case.chunk), dtype="float32",
        compressors=zarr.codecs.ZstdCodec(level=3), zarr_format=3,
    )
    da.to_zarr(out.rechunk((classes, case.chunk, case.chunk, case.chunk)), target)
    return {"seconds": time.perf_counter() - t0, "voxels": int(np.prod(x.shape)), "peak_rss": peak_rss()}


def run_map_overlap_z64(case: Case) -> dict[str, Any]:
    return run_map_overlap(case, chunk=case.chunk, halo=int(case.patch * case.overlap) // 2)


def run_unetflow(case: Case) -> dict[str, Any]:
    """``unetflow segment INPUT OUTPUT --workers N`` at its defaults (patch and overlap as given)."""
    from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
    from unetflow.model.predictor import CheckpointSource
    from unetflow.run import segment

    gpu = case.device.startswith("cuda")
    config = RunConfig(
        input=case.input, output=case.output, model=case.model,
        tiling=TilingSpec(patch_shape=(case.patch,) * 3, overlap=case.overlap, batch_size=case.batch_size),
        output_settings=OutputSettings(overwrite=True),
        cluster=ClusterSpec(kind="inline") if case.inline else ClusterSpec(kind="local", workers=case.workers, gpus=1 if gpu else 0, processes=case.processes),
        device="cuda" if gpu else "cpu", amp=case.amp, tuning=case.tuning,
    )
    set_threads(case)
    t0 = time.perf_counter()
    report = segment(config, source=CheckpointSource(case.model), progress=False)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds, "seconds_blocks": report.seconds, "voxels": report.voxels, "peak_rss": peak_rss(),
        "blocks": report.blocks_done, "block_redundancy": round(report.summary["patches_total"] / report.summary["patches_global"], 3),
        "worker_peak_rss": {pid: int(mb * 2**20) for pid, mb in report.telemetry["peak_rss_per_worker_mb"].items()},
        "telemetry": report.telemetry,
    }


METHODS = {"floor": run_floor, "monai": run_monai, "map_overlap": run_map_overlap, "map_overlap_z64": run_map_overlap_z64,
           "unetflow": run_unetflow}
