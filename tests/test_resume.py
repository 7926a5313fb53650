"""Surviving runs (issue 5): kill and resume, locks, failing blocks, parts, resources, YAML."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import assert_blended, random_image, write_zarr
from unetflow import resume
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec, apply_overrides, load_yaml, run_config_from_mapping
from unetflow.errors import BlockFailedError, ConfigError, LockedError, OutputExistsError
from unetflow.model.testing import ScaleNetSource
from unetflow.run import segment

ROOT = Path(__file__).resolve().parents[1]
BLOCK, PATCH = (8, 8, 8), (8, 8, 8)  # 3 x 5 x 3 = 45 blocks of the 19 x 33 x 17 image


def config(inp, out, *, cluster=None, **kw):
    return RunConfig(
        input=str(inp), output=str(out), model="(oracle)",
        tiling=TilingSpec(block_shape=BLOCK, patch_shape=PATCH, overlap=0.0),
        output_settings=OutputSettings(chunk_shape=BLOCK), cluster=cluster or ClusterSpec(kind="inline"), **kw,
    )


def report_of(out, part=None):
    return json.loads(resume.RunDir(str(out)).report_file(part).read_text())


KILLABLE = textwrap.dedent("""
    import sys
    from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
    from unetflow.model.testing import ScaleNetSource
    from unetflow.run import segment
    cfg = RunConfig(input=sys.argv[1], output=sys.argv[2], model="(oracle)",
                    tiling=TilingSpec(block_shape=(8, 8, 8), patch_shape=(8, 8, 8), overlap=0.0),
                    output_settings=OutputSettings(chunk_shape=(8, 8, 8)), cluster=ClusterSpec(kind="inline"))
    segment(cfg, source=ScaleNetSource(factor=2.0, delay=float(sys.argv[3])), progress=False)
""")


def start_slow_run(inp, out, delay=0.1):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", KILLABLE, str(inp), str(out), str(delay)], env=env, start_new_session=True,
                            stderr=subprocess.PIPE, text=True)


def wait_until(predicate, timeout=60.0, what="condition"):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_resume_lock_and_stale_takeover(tmp_path, image3d):
    inp, data = image3d
    out = tmp_path / "pred.zarr"
    run_dir = resume.RunDir(str(out))
    proc = start_slow_run(inp, out)
    try:
        wait_until(lambda: len(run_dir.done_blocks()) >= 8, what="8 blocks done")
        # a second run on the same output is refused, naming the holder
        for kw in ({}, {"resume": True}):
            with pytest.raises(LockedError, match=rf"another run \(host \S+, pid {proc.pid}, started "):
                segment(config(inp, out, **kw), source=ScaleNetSource(factor=2.0), progress=False)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run, mid-block
        proc.wait()
    before = run_dir.markers()
    assert 8 <= len(before) < 45, "the run was not killed midway"
    assert run_dir.lock_file().exists()  # the dead run's lock stays behind
    with pytest.raises(LockedError, match=rf"stale lock of a dead run \(host \S+, pid {proc.pid}, .*pass --resume"):
        segment(config(inp, out), source=ScaleNetSource(factor=2.0), progress=False)
    report = segment(config(inp, out, resume=True), source=ScaleNetSource(factor=2.0), progress=False)
    # finished blocks were not computed again: their markers are the killed run's
    after = run_dir.markers()
    assert {b: after[b] for b in before} == before
    assert sorted(after) == list(range(45))
    assert report.blocks_skipped == len(before) and report.blocks_done == 45 - len(before)
    assert {r.block_id for r in report.results}.isdisjoint(before)
    assert not run_dir.lock_file().exists()
    summary = report_of(out)
    assert summary["status"] == "complete" and summary["blocks"]["skipped"] == len(before)
    # bit for bit equal to an uninterrupted run
    segment(config(inp, tmp_path / "ref.zarr"), source=ScaleNetSource(factor=2.0), progress=False)
    resumed, ref = zarr.open_array(str(out))[:], zarr.open_array(str(tmp_path / "ref.zarr"))[:]
    assert resumed.tobytes() == ref.tobytes()
    assert_blended(resumed[0], 2.0 * data)


def test_resume_refuses_other_settings_or_model(tmp_path, image3d):
    inp, _ = image3d
    out = tmp_path / "o.zarr"
    segment(config(inp, out), source=ScaleNetSource(factor=2.0), progress=False)
    with pytest.raises(ConfigError, match=r"other settings or another model \(model.factor: was 2.0, now 3.0"):
        segment(config(inp, out, resume=True), source=ScaleNetSource(factor=3.0), progress=False)
    other = config(inp, out, resume=True)
    other = apply_overrides(other, {"tiling.overlap": 0.25})
    with pytest.raises(ConfigError, match="settings.tiling.overlap"):
        segment(other, source=ScaleNetSource(factor=2.0), progress=False)
    with pytest.raises(OutputExistsError, match="pass --resume to finish it"):
        segment(config(inp, out), source=ScaleNetSource(factor=2.0), progress=False)
    # same settings: nothing to do; a different cluster or batch size is still the same run
    again = apply_overrides(config(inp, out, resume=True), {"tiling.batch_size": 7})
    report = segment(again, source=ScaleNetSource(factor=2.0), progress=False)
    assert report.blocks_done == 0 and report.blocks_skipped == 45
    # --overwrite clears the markers with the output
    report = segment(apply_overrides(config(inp, out), {"output_settings.overwrite": True}), source=ScaleNetSource(factor=2.0), progress=False)
    assert report.blocks_done == 45 and report.blocks_skipped == 0


def test_one_failure_message_for_blocks_and_labelling_phases():
    from unetflow.schedule import BlockFailure, failure_message, raise_failures

    failures = [BlockFailure(3, "ValueError: bad"), BlockFailure(7, "OSError: gone")]
    assert failure_message(failures, 9) == (
        "2 of 9 blocks failed (ids [3, 7]); first: block 3: ValueError: bad; "
        "fix the cause and rerun with --resume to redo only the failed blocks"
    )
    assert failure_message(failures, 9, where=lambda b: f"at {b * 2}", details="r.json").startswith(
        "2 of 9 blocks failed (ids [3, 7]); first: block 3 at 6: ValueError: bad; details in r.json; fix"
    )
    raise_failures([], 9)  # nothing failed: nothing raised
    with pytest.raises(BlockFailedError, match=r"^2 of 9 blocks failed \(ids \[3, 7\]\)"):
        raise_failures(failures, 9)


@pytest.mark.parametrize("cluster", [ClusterSpec(kind="local", workers=2, retries=1), ClusterSpec(kind="inline")], ids=["local", "inline"])
def test_failing_block_reported_others_finish_resume_redoes_it(tmp_path, cluster):
    data = random_image((16, 24, 16)).astype(np.float32)
    data[4, 12, 4] = 1e6  # inside block 2 only (its patches do not cross block borders)
    inp = write_zarr(tmp_path / "in.zarr", data)
    out = tmp_path / "o.zarr"
    with pytest.raises(BlockFailedError, match=r"1 of 12 blocks failed .*block 2 write box offset \[0, 8, 0\] shape \[8, 8, 8\].*--resume"):
        segment(config(inp, out, cluster=cluster), source=ScaleNetSource(factor=2.0, fail_above=1e5), progress=False)
    summary = report_of(out)
    assert summary["status"] == "failed" and summary["blocks"] == {"total": 12, "done": 11, "failed": 1, "skipped": 0}
    (failure,) = summary["failures"]
    assert failure["block_id"] == 2 and failure["write_box"] == {"offset": [0, 8, 0], "shape": [8, 8, 8]}
    assert "planted failure" in failure["error"] and failure["read_box"]["shape"] == [8, 8, 8]
    assert summary["workers"] and all(w["peak_memory_mb"] > 0 for w in summary["workers"].values())
    assert resume.RunDir(str(out)).done_blocks() == set(range(12)) - {2}
    report = segment(config(inp, out, resume=True), source=ScaleNetSource(factor=2.0), progress=False)
    assert [r.block_id for r in report.results] == [2] and report.blocks_skipped == 11
    assert_blended(zarr.open_array(str(out))[0], 2.0 * data)


def test_parts_write_one_output_together(tmp_path, image3d, caplog):
    inp, data = image3d
    out = tmp_path / "o.zarr"
    seen = []
    caplog.set_level("INFO", logger="unetflow.run")
    for i in (2, 1, 3):
        report = segment(config(inp, out, part=f"{i}/3"), source=ScaleNetSource(factor=2.0), progress=False)
        seen += [r.block_id for r in report.results]
        assert report_of(out, (i, 3))["blocks"]["total"] == 15
    assert sorted(seen) == list(range(45))  # each block once, by exactly one part
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith('{"event": "block_done"')]
    assert sorted(line["block_id"] for line in lines) == list(range(45))  # one structured log line per block
    assert set(lines[0]) >= {"write_box", "read_box", "seconds", "device", "worker", "patches"}
    assert_blended(zarr.open_array(str(out))[0], 2.0 * data)


def test_worker_resources_spread_blocks_over_workers(tmp_path, image3d):
    """Workers declaring GPU=1 (here on CPU, two threads each): blocks must ask for it too."""
    inp, data = image3d
    cluster = ClusterSpec(kind="local", workers=2, threads=2, resources={"GPU": 1})
    segment(config(inp, tmp_path / "o.zarr", cluster=cluster), source=ScaleNetSource(factor=2.0, delay=0.01), progress=False)
    per_worker = report_of(tmp_path / "o.zarr")["workers"]
    blocks = sorted(w["blocks"] for w in per_worker.values())
    assert len(blocks) >= 2 and sum(blocks) == 45 and blocks[-1] <= 40, per_worker  # spread, not piled onto one
    assert_blended(zarr.open_array(str(tmp_path / "o.zarr"))[0], 2.0 * data)


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""
        cluster:
          kind: slurm
          queue: gpu
          cores: 4
          memory: 16GB
          walltime: "02:00:00"
          gpus_per_job: 1
          job_script_prologue: ["module load cuda"]
          minimum_jobs: 1
          maximum_jobs: 8
        tiling: {block_shape: "128,128,128", blend: crop}
        output: {kind: labels}
    """))
    cfg = run_config_from_mapping(load_yaml(str(path)), input="a", output="b", model="m")
    assert cfg.cluster.kind == "slurm" and cfg.cluster.job_script_prologue == ("module load cuda",)
    assert cfg.tiling.block_shape == (128, 128, 128) and cfg.output_settings.kind == "labels"
    assert apply_overrides(cfg, {"tiling.blend": "gaussian"}).tiling.blend == "gaussian"
    with pytest.raises(ConfigError, match="did you mean 'walltime'"):
        run_config_from_mapping({"cluster": {"kind": "slurm", "wall_time": "1:00:00"}}, input="a", output="b", model="m")
    assert run_config_from_mapping({"cluster": "local"}, input="a", output="b", model="m").cluster.kind == "local"
    assert run_config_from_mapping({"cluster": {"address": "tcp://h:8786"}}, input="a", output="b", model="m").cluster.kind == "address"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "pipelines" / "configs").glob("*.yaml")))
def test_example_configs_load_and_make_job_scripts(tmp_path, name):
    from unetflow import schedule, tuning

    data = load_yaml(str(ROOT / "pipelines" / "configs" / name))
    if "inputs" in data:  # a nightly pipeline config
        data = data.get("settings", {})
    cfg = run_config_from_mapping(data, input="a", output="b", model="m")
    if cfg.cluster.is_jobqueue:
        cls = schedule.jobqueue_class(cfg.cluster.kind)
        script = cls(**schedule.jobqueue_options(cfg.cluster, log_directory=str(tmp_path), tuned=cfg.tuning)).job_script()
        assert "distributed.cli.dask_worker" in script and "DASK_DISTRIBUTED__WORKER__PRELOAD=" in script
        tuned = cls(**schedule.jobqueue_options(cfg.cluster, log_directory=str(tmp_path), tuned=True)).job_script()
        assert "export GLIBC_TUNABLES=" in tuned and tuning.WORKER_MALLOC_TUNABLES in tuned and "UNETFLOW_TUNING" in tuned
        assert "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=" in tuned
        assert ("GLIBC_TUNABLES" in script) is cfg.tuning  # off unless the config asks


def test_jobqueue_import_writes_nothing_to_home(tmp_path):
    code = "from unetflow import schedule; schedule.jobqueue_class('slurm'); print('ok')"
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(ROOT), DASK_CONFIG="")
    env.pop("DASK_CONFIG")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok" and list(tmp_path.iterdir()) == []


def test_an_output_of_unetflow_0_1_is_still_unetflows(tmp_path):
    """0.1 kept its run folder inside the store; --overwrite may still replace such an output."""
    out = tmp_path / "old.zarr"
    (out / ".unetflow").mkdir(parents=True)
    (out / ".unetflow" / "run.json").write_text(json.dumps({"fingerprint": "abc", "identity": {}}))
    assert resume.is_unetflow_output(str(out))
    assert not resume.is_unetflow_output(str(tmp_path / "other.zarr"))
