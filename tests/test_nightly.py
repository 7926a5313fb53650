"""pipelines/nightly.py on a folder of three small inputs, one of them broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import zarr

from conftest import assert_blended, random_image, write_zarr
from unetflow.resume import RunDir

ROOT = Path(__file__).resolve().parents[1]


def nightly(config):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / "nightly.py"), str(config)], env=env, capture_output=True, text=True, timeout=120)


def two_inputs_and_config(tmp_path, cluster):
    """incoming/a.zarr and b.zarr (random), and a nightly config doubling them on *cluster*."""
    incoming = tmp_path / "incoming"
    data = {name: random_image((10, 12, 9), seed=i) for i, name in enumerate(("a", "b"))}
    for name, arr in data.items():
        write_zarr(incoming / f"{name}.zarr", arr)
    config = tmp_path / "nightly.yaml"
    config.write_text(textwrap.dedent(f"""
        model_source: {{factory: "unetflow.model.testing:ScaleNetSource", args: {{factor: 2.0}}}}
        inputs: ["{incoming}/*.zarr"]
        outputs: {tmp_path / "pred"}
        settings:
          cluster: {cluster}
          tiling: {{block_shape: "8,8,8", patch_shape: "4,4,4"}}
    """))
    return incoming, data, config


def test_nightly_two_done_one_broken_then_nothing_to_redo(tmp_path):
    incoming, data, config = two_inputs_and_config(tmp_path, "inline")
    (incoming / "c.zarr").mkdir(parents=True)
    (incoming / "c.zarr" / "zarr.json").write_text("{ not json")  # the broken one
    first = nightly(config)
    assert first.returncode == 1, first.stderr
    summary = json.loads((tmp_path / "pred" / "nightly-summary.json").read_text())
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    assert summary["failed"] == [str(incoming / "c.zarr")]
    assert "c.zarr" in first.stdout and "FAILED" in first.stdout
    for name, arr in data.items():
        assert_blended(zarr.open_array(str(tmp_path / "pred" / f"{name}_pred.zarr"))[0], 2.0 * arr)
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [  # run folders beside the outputs (issue 18)
        "a_pred.zarr", "a_pred.zarr.unetflow", "b_pred.zarr", "b_pred.zarr.unetflow", "nightly-summary.json"]
    markers = {n: RunDir(str(tmp_path / "pred" / f"{n}_pred.zarr")).markers() for n in data}

    second = nightly(config)
    assert second.returncode == 1
    summary = json.loads((tmp_path / "pred" / "nightly-summary.json").read_text())
    assert summary["counts"] == {"done": 0, "skipped": 2, "failed": 1}
    assert all(e["blocks_done"] == 0 for e in summary["inputs"] if e["status"] == "skipped")
    assert {n: RunDir(str(tmp_path / "pred" / f"{n}_pred.zarr")).markers() for n in data} == markers


def test_nightly_inputs_share_one_cluster(tmp_path):
    """Two inputs on a local cluster: one worker process computed both (the cluster
    started once), and both outputs are exact."""
    _, data, config = two_inputs_and_config(tmp_path, "{kind: local, workers: 1}")
    done = nightly(config)
    assert done.returncode == 0, done.stderr
    workers = []
    for name, arr in data.items():
        out = tmp_path / "pred" / f"{name}_pred.zarr"
        assert_blended(zarr.open_array(str(out))[0], 2.0 * arr)
        workers.append(set(json.loads(RunDir(str(out)).report_file().read_text())["workers"]))
    assert len(workers[0]) == 1 and workers[0] == workers[1]
