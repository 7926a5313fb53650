"""Runs whose workers are real SLURM jobs (dask-jobqueue), on the local one-node SLURM.

The session fixture starts SLURM with ``../shared/slurm/start-local-slurm`` (relative to
the repository root) and skips when the script is absent. It stops nothing: the script
is idempotent and a SLURM that was already running may be serving someone else.
Deselect with ``-m "not slurm"``.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zarr

from conftest import assert_blended
from unetflow import resume
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec, load_yaml, run_config_from_mapping
from unetflow.model.testing import ScaleNetSource
from unetflow.run import segment

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
START = ROOT.parent / "shared" / "slurm" / "start-local-slurm"

SLURM_YAML = """
cluster:
  kind: slurm
  cores: 1
  memory: 1GB
  walltime: "00:10:00"
  interface: lo
  jobs: 2
  retries: 3
  wait_timeout: 60
tiling: {block_shape: "8,8,8", patch_shape: "8,8,8", overlap: 0.0}
output: {chunk_shape: "8,8,8"}
"""


@pytest.fixture(scope="session")
def slurm():
    if not START.exists():
        pytest.skip(f"no local SLURM start script at {START} (clone with ../shared beside the repository)")
    if os.geteuid() != 0:
        pytest.skip("starting the local SLURM needs root")
    done = subprocess.run([str(START)], capture_output=True, text=True, timeout=300, env=dict(os.environ, LOCAL_SLURM_QUIET="1"))
    if done.returncode != 0:
        pytest.fail(f"{START} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    # workers inherit the environment through sbatch: make this checkout importable there
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved) if p)
    yield done.stdout.strip()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


def slurm_config(tmp_path, inp, out):
    path = tmp_path / "slurm.yaml"
    path.write_text(textwrap.dedent(SLURM_YAML))
    return run_config_from_mapping(load_yaml(str(path)), input=str(inp), output=str(out), model="(oracle)")


def local_reference(inp, out):
    cfg = RunConfig(input=str(inp), output=str(out), model="(oracle)",
                    tiling=TilingSpec(block_shape=(8, 8, 8), patch_shape=(8, 8, 8), overlap=0.0),
                    output_settings=OutputSettings(chunk_shape=(8, 8, 8)), cluster=ClusterSpec(kind="local", workers=1))
    segment(cfg, source=ScaleNetSource(factor=2.0), progress=False)
    return zarr.open_array(str(out))[:]


def squeue_ids():
    out = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_slurm_config_run_equals_local_run(slurm, tmp_path, image3d):
    inp, data = image3d
    out = tmp_path / "pred.zarr"
    jobs_before = squeue_ids()
    report = segment(slurm_config(tmp_path, inp, out), source=ScaleNetSource(factor=2.0), progress=False)
    assert report.blocks_done == 45
    ref = local_reference(inp, tmp_path / "ref.zarr")
    assert zarr.open_array(str(out))[:].tobytes() == ref.tobytes()
    assert_blended(ref[0], 2.0 * data)
    job_ids = {m["job_id"] for m in resume.RunDir(str(out)).markers().values()}
    assert None not in job_ids and len(job_ids) >= 1  # blocks ran inside SLURM jobs
    assert list(resume.RunDir(str(out)).log_dir.iterdir())  # job logs next to the output, not in the cwd
    deadline = time.monotonic() + 15
    while squeue_ids() - jobs_before and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not (squeue_ids() - jobs_before & job_ids), "worker jobs still queued after the run"


def test_scancel_one_worker_job_mid_run(slurm, tmp_path, image3d):
    inp, data = image3d
    out = tmp_path / "pred.zarr"
    run_dir = resume.RunDir(str(out))
    outcome: dict[str, object] = {}

    def target():
        try:
            outcome["report"] = segment(slurm_config(tmp_path, inp, out), source=ScaleNetSource(factor=2.0, delay=0.15), progress=False)
        except BaseException as err:  # reported by the test below
            outcome["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 90
    victim = None
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        jobs = {m["job_id"] for m in run_dir.markers().values()} if run_dir.done_dir.exists() else set()
        if len(run_dir.done_blocks()) >= 4 and jobs:
            victim = sorted(jobs)[0]
        time.sleep(0.1)
    assert victim, "no block finished in a SLURM job"
    subprocess.run(["scancel", victim], check=True)
    thread.join(timeout=150)
    assert not thread.is_alive(), "the run did not finish after the scancel"
    assert "error" not in outcome, outcome.get("error")
    markers = run_dir.markers()
    assert sorted(markers) == list(range(45))
    assert len({m["job_id"] for m in markers.values()}) >= 2  # the other job (or a replacement) did the rest
    assert_blended(zarr.open_array(str(out))[0], 2.0 * data)
    ref = local_reference(inp, tmp_path / "ref.zarr")
    assert zarr.open_array(str(out))[:].tobytes() == ref.tobytes()
