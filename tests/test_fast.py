"""Issue 6: skipping blocks without signal, streamed blocks, telemetry (CPU, no timings asserted)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from conftest import assert_blended, random_image, write_zarr
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, SkipSpec, TilingSpec
from unetflow.errors import ConfigError
from unetflow.geometry import Box
from unetflow.read import scale_box
from unetflow.model.testing import ScaleNet, ScaleNetSource
from unetflow.run import segment
from unetflow.telemetry import STAGES


class CountingSource(ScaleNetSource):
    """A ScaleNet whose forward passes are counted in a class attribute (inline runs only)."""

    calls = 0

    def load(self) -> ScaleNet:
        net = super().load()
        original = net.forward

        def forward(x):
            CountingSource.calls += 1
            return original(x)

        net.forward = forward
        return net


def _run(tmp_path, data, *, block, skip=SkipSpec(), source=None, name="o.zarr", chunks=None):
    inp = write_zarr(tmp_path / "in.zarr", data, chunks=chunks)
    config = RunConfig(
        input=inp, output=str(tmp_path / name), model="(oracle)",
        tiling=TilingSpec(block_shape=block, patch_shape=(4, 4, 4), batch_size=2),
        output_settings=OutputSettings(overwrite=True, chunk_shape=block),
        cluster=ClusterSpec(kind="inline"), skip=skip,
    )
    report = segment(config, source=source or ScaleNetSource(factor=2.0), progress=False)
    return zarr.open_array(str(tmp_path / name))[0], report


def test_skip_empty_fills_and_skips_the_model(tmp_path):
    data = np.full((24, 8, 8), 7, dtype="uint16")
    data[12:] = random_image((12, 8, 8))  # block 0 (z 0..8, read box to z ~10) is constant
    CountingSource.calls = 0
    out, report = _run(tmp_path, data, block=(8, 8, 8), skip=SkipSpec(empty=True), source=CountingSource(factor=2.0))
    assert [r.skipped for r in sorted(report.results, key=lambda r: r.block_id)] == ["empty", "", ""]
    assert CountingSource.calls > 0 and report.telemetry["blocks_skipped"]["empty"] == 1
    assert (out[:8] == 0).all()  # the fill value, not 2 * 7
    assert_blended(out[8:], 2.0 * data[8:].astype(np.float32))


def test_skip_empty_constant_image_runs_no_model(tmp_path):
    data = np.full((16, 8, 8), 5, dtype="uint8")
    CountingSource.calls = 0
    out, report = _run(tmp_path, data, block=(8, 8, 8), skip=SkipSpec(empty=True), source=CountingSource(factor=2.0))
    assert CountingSource.calls == 0
    assert all(r.skipped == "empty" and r.n_patches == 0 for r in report.results)
    assert (out == 0).all()  # the fill value


def test_skip_threshold(tmp_path):
    data = random_image((8, 8, 8), dtype="uint8")
    data = (data % 10).astype("uint8")  # values 0..9, below the threshold
    out, report = _run(tmp_path, data, block=(8, 8, 8), skip=SkipSpec(empty=True, threshold=50))
    assert [r.skipped for r in report.results] == ["empty"]
    assert (out == 0).all()


def test_mask_at_lower_resolution_skips_blocks(tmp_path):
    data = random_image((16, 16, 8))
    mask = np.zeros((4, 4, 2), dtype="uint8")
    mask[2:, 2:, :] = 1  # foreground only in the block at z 8.., y 8..
    mask_path = write_zarr(tmp_path / "mask.zarr", mask)
    out, report = _run(tmp_path, data, block=(8, 8, 8), skip=SkipSpec(mask=mask_path))
    skipped = {r.block_id: r.skipped for r in report.results}
    assert skipped == {0: "mask", 1: "mask", 2: "mask", 3: ""}
    assert_blended(out[8:, 8:], 2.0 * data[8:, 8:].astype(np.float32))
    assert (out[:8] == 0).all() and (out[:, :8] == 0).all()


def test_scale_box_covers_the_box():
    # image 10 voxels, mask 3: image voxels 3..6 lie in mask voxels 0..2
    assert scale_box(Box((3,), (4,)), (10,), (3,)) == Box((0,), (3,))
    assert scale_box(Box((8, 0), (2, 5)), (10, 5), (5, 5)) == Box((4, 0), (1, 5))


def test_streamed_block_flushes_in_chunks_and_stays_exact(tmp_path):
    # a tall block (40 planes) written in chunk units of 8 while it streams
    data = random_image((40, 12, 9))
    out, report = _run(tmp_path, data, block=(40, 12, 9), chunks=(8, 8, 8))
    assert_blended(out, 2.0 * data.astype(np.float32))
    out2, _ = _run(tmp_path, data, block=(8, 12, 9), name="o2.zarr")
    np.testing.assert_array_equal(out, out2)


def test_telemetry_fields(tmp_path):
    data = random_image((16, 8, 8))
    _, report = _run(tmp_path, data, block=(8, 8, 8))
    for r in report.results:
        assert r.seconds_read > 0 and r.seconds_compute > 0 and r.seconds_write > 0
        assert r.seconds_wall >= r.seconds_compute and r.peak_rss > 0 and 0 < r.busy <= 1
    t = report.telemetry
    assert set(t["seconds"]) == {*STAGES, "wall"} and t["bound_by"] in t["seconds"]
    assert t["peak_rss_per_worker_mb"] and "busy" in t["verdict"] and "bound by" in t["verdict"]


@pytest.mark.parametrize("tuned", [False, True])
def test_worker_processes_are_tuned_only_when_asked(tuned):
    """Without tuning a worker process keeps the system's allocator, collector and Dask
    timers (distributed's own MALLOC_TRIM_THRESHOLD_ included); with it, workers get
    GLIBC_TUNABLES, no MALLOC_TRIM_THRESHOLD_, a frozen heap and the profiler off. The
    preload (torch imported before the first block) runs either way."""
    import os

    import dask
    import distributed  # noqa: F401  (its config defaults)

    from unetflow import schedule, tuning

    environ = dict(os.environ)
    expected = (os.environ.get("GLIBC_TUNABLES") or tuning.WORKER_MALLOC_TUNABLES) if tuned else os.environ.get("GLIBC_TUNABLES")
    default_trim = dask.config.get("distributed.nanny.pre-spawn-environ", {}).get("MALLOC_TRIM_THRESHOLD_")
    with schedule.open_client(ClusterSpec(kind="local", workers=1, processes=True), tuned=tuned) as client:
        env = next(iter(client.run(lambda: {k: os.environ.get(k) for k in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_")}).values()))
        profile = next(iter(client.run(lambda: __import__("dask").config.get("distributed.worker.profile.enabled")).values()))
        loaded = next(iter(client.run(_preloaded).values()))
    assert profile is (not tuned)  # the worker's 10 ms profiler: off only when tuned (tuning.HOUSEKEEPING)
    trim = None if tuned else (str(default_trim) if default_trim is not None else None)
    assert env == {"GLIBC_TUNABLES": expected, "MALLOC_TRIM_THRESHOLD_": trim}
    assert loaded["infer"]  # the preload ran before any block: torch in
    assert (loaded["frozen"] > 10_000) is tuned  # gc.freeze only when tuned
    assert dict(os.environ) == environ  # distributed's nannies wrote into this process's environment: given back


def test_a_run_leaves_the_callers_process_as_it_found_it(tmp_path):
    """Blocks computed in this process (one threaded worker, --workers 0) set torch's threads
    to 1 and, untuned, touch neither the allocator nor the environment: all restored."""
    import os

    import torch

    torch.set_num_threads(2)
    environ = dict(os.environ)
    inp = write_zarr(tmp_path / "in.zarr", np.random.default_rng(0).random((8, 16, 16), dtype=np.float32), chunks=(8, 16, 16))
    cfg = RunConfig(input=inp, output=str(tmp_path / "out.zarr"), model="(x2)", cluster=ClusterSpec(kind="inline"), device="cpu")
    segment(cfg, source=ScaleNetSource(factor=2.0), progress=False)
    assert torch.get_num_threads() == 2
    assert dict(os.environ) == environ


def _preloaded() -> dict:
    import gc
    import sys

    return {"infer": "unetflow.infer" in sys.modules, "frozen": gc.get_freeze_count()}


def test_one_cpu_worker_runs_in_this_process_several_in_their_own(tmp_path):
    """The default single CPU worker is dask's threaded worker in the driver's process (no
    second start of torch); ``processes=True``, or several workers, get a process each.
    The bytes written are the same."""
    import os

    from unetflow import schedule

    data = random_image((16, 8, 8))
    inp = write_zarr(tmp_path / "in.zarr", data)
    outs = {}
    for name, spec in {"threads": ClusterSpec(kind="local"), "process": ClusterSpec(kind="local", processes=True)}.items():
        config = RunConfig(
            input=inp, output=str(tmp_path / f"{name}.zarr"), model="(oracle)", cluster=spec,
            tiling=TilingSpec(block_shape=(8, 8, 8), patch_shape=(4, 4, 4)), output_settings=OutputSettings(chunk_shape=(8, 8, 8)),
        )
        report = segment(config, source=ScaleNetSource(factor=2.0), progress=False)
        assert ({r.pid for r in report.results} == {os.getpid()}) == (name == "threads")
        outs[name] = zarr.open_array(str(tmp_path / f"{name}.zarr"))[:]
    np.testing.assert_array_equal(outs["threads"], outs["process"])
    assert_blended(outs["threads"][0], 2.0 * data.astype(np.float32))
    assert schedule.computes_here(ClusterSpec(kind="local")) and schedule.computes_here(ClusterSpec(kind="inline"))
    assert not schedule.computes_here(ClusterSpec(kind="local", workers=2))
    assert schedule.computes_here(ClusterSpec(kind="local", workers=2, processes=False))
    assert not schedule.computes_here(ClusterSpec(kind="local", gpus=1))
    with pytest.raises(ConfigError, match="GPU workers are processes"):
        ClusterSpec(kind="local", gpus=1, processes=False)


def test_a_failed_or_interrupted_run_stops_its_blocks_in_this_process(tmp_path):
    """Blocks running in the driver's process stop at their next forward pass when their
    run fails (a Ctrl-C included), and the next run is not affected."""
    from unetflow import infer
    from unetflow.errors import BlockFailedError

    from unetflow.run import _closing

    data = random_image((16, 8, 8))
    infer.cancel_blocks()
    try:
        with pytest.raises(BlockFailedError, match="BlockCancelled: block 0 stopped: its run failed or was interrupted"):
            _run(tmp_path, data, block=(8, 8, 8))
    finally:
        infer.cancel_blocks(False)
    out, report = _run(tmp_path, data, block=(8, 8, 8), name="again.zarr")
    assert report.blocks_done == 2
    assert_blended(out, 2.0 * data.astype(np.float32))

    class Dispatch:  # records whether blocks were told to stop when the cluster closed
        seen: list = []

        def close(self):
            self.seen.append(infer._CANCELLED.is_set())

    with pytest.raises(KeyboardInterrupt), _closing(Dispatch(), always=False):
        raise KeyboardInterrupt
    with _closing(Dispatch(), always=True):
        pass
    assert Dispatch.seen == [True, False] and not infer._CANCELLED.is_set()


def _tune_in_a_new_process(before: str = "", **env: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    code = before + "import json, unetflow.tuning as w; print(json.dumps(w.tune_allocator()))"
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**environ, **env}, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_tune_allocator_takes_both_settings_or_neither():
    """A worker in the driver's process gets huge pages for torch's buffers and the 4 MiB
    mmap threshold, never the threshold alone (without huge pages it slowed the model
    ~45 %); a GLIBC_TUNABLES already given (worker processes, the user) is left alone."""
    import pathlib

    mode_file = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode_file.exists():
        pytest.skip("no transparent huge pages on this system")
    mode = mode_file.read_text().split("[")[1].split("]")[0]
    fresh = _tune_in_a_new_process()
    assert fresh == {"huge_pages": mode != "never", "mmap_threshold": mode != "never", "skipped": False}
    late = _tune_in_a_new_process("import torch; torch.ones(8); ")  # torch read its settings already
    assert late == {"huge_pages": mode == "always", "mmap_threshold": mode == "always", "skipped": False}
    given = _tune_in_a_new_process(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=4194304")
    assert given == {"huge_pages": False, "mmap_threshold": False, "skipped": True}


def test_worker_preload_keeps_the_users_own():
    import dask

    from unetflow import schedule

    with dask.config.set({"distributed.worker.preload": ["mylab.setup"]}):
        assert schedule.worker_dask_config()["distributed.worker.preload"] == ["mylab.setup", schedule.WORKER_PRELOAD]
    assert "DASK_DISTRIBUTED__WORKER__PRELOAD" in schedule.job_env()
    assert "GLIBC_TUNABLES" not in schedule.job_env() and "GLIBC_TUNABLES" in schedule.job_env(tuned=True)


def test_dispatcher_starts_the_cluster_in_the_background_and_closes_once(tmp_path):
    """start() returns at once; the first dispatch waits for the cluster; a run with no
    blocks to do (or inline) opens none; close() is idempotent."""
    import time

    from unetflow import schedule

    got = []
    with schedule.Dispatcher(ClusterSpec(kind="local", workers=1)) as dispatch:
        assert dispatch([], None, [], on_result=got.append) == [] and dispatch._client is None  # nothing to do: no cluster
        t0 = time.perf_counter()
        dispatch.start()
        assert time.perf_counter() - t0 < 0.5  # does not wait for the workers
        assert dispatch(_double, 3, [1, 2], on_result=got.append) == []
        dispatch.close()
        dispatch.close()
    assert sorted(got) == [5, 7]
    inline = []
    with schedule.Dispatcher(ClusterSpec(kind="inline")) as dispatch:
        dispatch.start()
        assert dispatch._client is None and dispatch(_double, 3, [1], on_result=inline.append) == []
    assert inline == [5]


def _double(job, block_id):
    return 2 * block_id + job



def test_cluster_starts_early_only_for_a_fresh_output_on_a_cluster_that_does_not_write_into_it(tmp_path):
    from unetflow import schedule

    def cfg(out="new.zarr", **kw):
        base = dict(input="in.zarr", output=str(tmp_path / out), model="m.pt", cluster=ClusterSpec(kind="local", workers=1))
        return RunConfig(**{**base, **kw})

    (tmp_path / "old.zarr").mkdir()
    assert schedule.starts_early(cfg())
    assert schedule.starts_early(cfg("old.zarr", output_settings=OutputSettings(overwrite=True)))
    assert not schedule.starts_early(cfg("old.zarr"))  # refused (exists) or --resume: no cluster for that
    assert not schedule.starts_early(cfg(resume=True))
    assert not schedule.starts_early(cfg(part="1/2"))
    assert not schedule.starts_early(cfg(dry_run=True))
    assert not schedule.starts_early(cfg(cluster=ClusterSpec(kind="inline")))
    assert not schedule.starts_early(cfg(cluster=ClusterSpec(kind="slurm")))  # its job logs go into the output
