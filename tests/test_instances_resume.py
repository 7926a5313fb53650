"""Instances that survive (issue 16): every phase resumes after SIGKILL, parts merge, the
merge streams. The oracle is an uninterrupted run, compared byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from conftest import write_zarr
from test_instances import same_up_to_renumbering, soft_probabilities
from test_resume import ROOT, wait_until
from unetflow import instances, resume
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
from unetflow.label import instance_classes, label_whole, merge_table
from unetflow.model.testing import ScaleNetSource
from unetflow.output import scratch_path
from unetflow.run import segment
from unetflow.sample import make_sample
from unetflow.train.targets import instance_to_classes

SHAPE, BLOCK = (19, 33, 17), (8, 8, 8)  # 3 x 5 x 3 = 45 blocks, none of them whole at the far faces
N_BLOCKS = 45


def config(inp, out, *, shape=SHAPE, block=BLOCK, cluster=None, **kw):
    return RunConfig(
        input=str(inp), output=str(out), model="(oracle)",
        tiling=TilingSpec(block_shape=block, patch_shape=tuple(min(8, b) for b in block)),
        output_settings=OutputSettings(kind="instances", chunk_shape=block), cluster=cluster or ClusterSpec(kind="inline"), **kw,
    )


def source(dims=3, delay=0.0):
    return ScaleNetSource(dims=dims, channels=3, delay=delay)


def probabilities(shape, seed=3):
    _, truth = make_sample(shape, seed=seed)
    return soft_probabilities(instance_to_classes(truth))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The input and an uninterrupted run's output (checked against the whole-image rule)."""
    root = tmp_path_factory.mktemp("reference")
    probs = probabilities(SHAPE)
    inp = write_zarr(root / "in.zarr", probs, chunks=(3, *BLOCK))
    segment(config(inp, root / "ref.zarr"), source=source(), progress=False)
    ref = zarr.open_array(str(root / "ref.zarr"))[:]
    assert same_up_to_renumbering(ref, label_whole(instance_classes(probs))) and ref.max() > 5
    return inp, ref


# A run of SHAPE/BLOCK whose phase (argv[3]) is slow, so that the test can kill it there;
# argv[4] is a file it creates once it is inside a phase that has no per-block files.
KILLABLE = textwrap.dedent("""
    import pathlib, sys, time
    from unetflow import instances
    from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
    from unetflow.model.testing import ScaleNetSource
    from unetflow.run import segment
    inp, out, phase, sentinel = sys.argv[1:5]

    def slow(fn, seconds):
        def run(*args):
            time.sleep(seconds)
            return fn(*args)
        return run

    def stuck(fn, after=0):
        def run(*args):
            pathlib.Path(sentinel).touch()
            time.sleep(600)
        return run

    def stuck_reading(fn):
        def run(*args):
            for i, pairs in enumerate(fn(*args)):
                if i == 10:
                    pathlib.Path(sentinel).touch()
                    time.sleep(600)
                yield pairs
        return run

    if phase == "pairs":
        instances.block_face_pairs = slow(instances.block_face_pairs, 0.1)
    if phase == "relabel":
        instances.block_relabel = slow(instances.block_relabel, 0.1)
    if phase == "number":
        instances.block_counts = stuck(instances.block_counts)
    if phase == "merge":
        instances.read_pairs = stuck_reading(instances.read_pairs)
    if phase == "clean-up":
        instances._clean_up = stuck(instances._clean_up)
    cfg = RunConfig(input=inp, output=out, model="(oracle)",
                    tiling=TilingSpec(block_shape=(8, 8, 8), patch_shape=(8, 8, 8)),
                    output_settings=OutputSettings(kind="instances", chunk_shape=(8, 8, 8)), cluster=ClusterSpec(kind="inline"))
    segment(cfg, source=ScaleNetSource(dims=3, channels=3, delay=0.05 if phase == "blocks" else 0.0), progress=False)
""")


def kill_during(phase, inp, out, tmp_path):
    """Start a run, SIGKILL it (the whole process group) inside *phase*; return what it left."""
    run_dir = resume.RunDir(str(out))
    folder = instances.Folder.of(run_dir)
    sentinel = tmp_path / f"in-{phase}"
    reached = {
        "blocks": lambda: len(run_dir.done_blocks()) >= 8,
        "pairs": lambda: len(instances.listed_ids(folder.pairs_dir, ".npy")) >= 8,
        "relabel": lambda: len(instances.listed_ids(folder.relabel_dir, ".json")) >= 8,
    }.get(phase, sentinel.exists)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(inp), str(out), phase, str(sentinel)], env=env,
                            start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: reached() or proc.poll() is not None, timeout=120, what=f"the run to reach {phase}")
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {
        "blocks": run_dir.markers(),
        "pairs": {b: os.stat(folder.pairs(b)).st_mtime_ns for b in instances.listed_ids(folder.pairs_dir, ".npy")},
        "relabel": {b: resume.read_json(folder.relabel_dir / f"{b}.json") for b in instances.listed_ids(folder.relabel_dir, ".json")},
    }


def counting(monkeypatch, name):
    """Count the calls of ``instances.<name>`` (blocks run inline, in this process)."""
    calls = []
    real = getattr(instances, name)

    def counted(job, block_id):
        calls.append(block_id)
        return real(job, block_id)

    monkeypatch.setattr(instances, name, counted)
    return calls


@pytest.mark.parametrize("phase", ["blocks", "number", "pairs", "merge", "relabel", "clean-up"])
def test_killed_in_any_phase_resume_is_bit_identical(tmp_path, reference, monkeypatch, phase):
    inp, ref = reference
    out = tmp_path / "inst.zarr"
    left = kill_during(phase, inp, out, tmp_path)
    run_dir = resume.RunDir(str(out))
    folder = instances.Folder.of(run_dir)
    if phase == "blocks":
        assert 8 <= len(left["blocks"]) < N_BLOCKS, "the run was not killed midway through the blocks"
    else:
        assert sorted(left["blocks"]) == list(range(N_BLOCKS)) and all("objects" in m for m in left["blocks"].values())
    if phase in ("pairs", "relabel"):
        assert 8 <= len(left[phase]) < N_BLOCKS, f"the run was not killed midway through {phase}"
    assert (phase == "clean-up") == folder.finished.exists()
    pair_calls, relabel_calls = counting(monkeypatch, "block_face_pairs"), counting(monkeypatch, "block_relabel")
    report = segment(config(inp, out, resume=True), source=source(), progress=False)
    assert (zarr.open_array(str(out))[:]).tobytes() == ref.tobytes()
    # nothing finished was done again: markers and pair files are the killed run's
    after = run_dir.markers()
    assert {b: after[b] for b in left["blocks"]} == left["blocks"]
    assert report.blocks_skipped == len(left["blocks"]) and {r.block_id for r in report.results}.isdisjoint(left["blocks"])
    expected_pairs = [] if phase in ("merge", "relabel", "clean-up") else sorted(set(range(N_BLOCKS)) - set(left["pairs"]))
    assert sorted(pair_calls) == expected_pairs
    expected_relabel = [] if phase == "clean-up" else sorted(set(range(N_BLOCKS)) - set(left["relabel"]))
    assert sorted(relabel_calls) == expected_relabel
    relabelled = {b: resume.read_json(folder.relabel_dir / f"{b}.json") for b in left["relabel"]}
    assert relabelled == left["relabel"]
    assert folder.finished.exists() and not os.path.exists(scratch_path(str(out))) and not folder.pairs_dir.exists()
    assert not run_dir.lock_file().exists()


def test_resume_of_a_finished_output_does_nothing(tmp_path, reference, monkeypatch):
    inp, ref = reference
    out = tmp_path / "inst.zarr"
    segment(config(inp, out), source=source(), progress=False)
    calls = counting(monkeypatch, "block_face_pairs") + counting(monkeypatch, "block_relabel")
    report = segment(config(inp, out, resume=True), source=source(), progress=False)
    assert report.blocks_done == 0 and report.blocks_skipped == N_BLOCKS and calls == []
    assert zarr.open_array(str(out))[:].tobytes() == ref.tobytes()


@pytest.mark.parametrize("cluster", [ClusterSpec(kind="inline"), ClusterSpec(kind="local", workers=2)], ids=["inline", "local"])
def test_parts_then_resume_equal_one_run(tmp_path, reference, cluster):
    inp, ref = reference
    out = tmp_path / "inst.zarr"
    run_dir = resume.RunDir(str(out))
    seen = []
    for i in (2, 1):
        report = segment(config(inp, out, part=f"{i}/2", cluster=cluster), source=source(), progress=False)
        seen += [r.block_id for r in report.results]
        assert not instances.Folder.of(run_dir).path.exists()  # a part leaves labelling to the final --resume
    assert sorted(seen) == list(range(N_BLOCKS))
    assert os.path.isdir(scratch_path(str(out))) and (zarr.open_array(str(out))[:] == 0).all()
    report = segment(config(inp, out, resume=True, cluster=cluster), source=source(), progress=False)
    assert report.blocks_done == 0 and report.blocks_skipped == N_BLOCKS  # no GPU block computed twice
    assert zarr.open_array(str(out))[:].tobytes() == ref.tobytes()
    assert instances.complete(run_dir)


@pytest.mark.parametrize("shape, block", [
    ((37, 45), (8, 16)),      # 2-D, 5 x 3 blocks, odd edges
    ((13, 21, 11), (4, 8, 8)),  # 3-D, 4 x 3 x 2 blocks
])
def test_parts_of_odd_shapes(tmp_path, shape, block):
    probs = probabilities(shape, seed=5)
    inp = write_zarr(tmp_path / "in.zarr", probs, chunks=(3, *block))
    whole, parted = tmp_path / "whole.zarr", tmp_path / "parted.zarr"
    segment(config(inp, whole, shape=shape, block=block), source=source(len(shape)), progress=False)
    for i in (3, 1, 2):
        segment(config(inp, parted, shape=shape, block=block, part=f"{i}/3"), source=source(len(shape)), progress=False)
    segment(config(inp, parted, shape=shape, block=block, resume=True), source=source(len(shape)), progress=False)
    got, expected = zarr.open_array(str(parted))[:], zarr.open_array(str(whole))[:]
    assert got.tobytes() == expected.tobytes()
    assert same_up_to_renumbering(got, label_whole(instance_classes(probs)))


def test_a_missing_scratch_is_named(tmp_path, reference):
    inp, _ = reference
    out = tmp_path / "inst.zarr"
    segment(config(inp, out, part="1/1"), source=source(), progress=False)
    instances.store.remove(scratch_path(str(out)))
    from unetflow.errors import OutputWriteError

    with pytest.raises(OutputWriteError, match=r"instances scratch .* is missing.*pass --overwrite"):
        segment(config(inp, out, resume=True), source=source(), progress=False)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch", [1, 7, 1 << 20])
def test_stream_merge_equals_the_in_memory_merge(seed, batch):
    rng = np.random.default_rng(seed)
    total = 500
    pairs = rng.integers(1, total + 1, size=(400, 2))
    pairs = np.concatenate([pairs, np.stack([np.arange(100, 300), np.arange(101, 301)], axis=1)])  # a long chain
    expected = merge_table(total, pairs)
    pieces = np.array_split(pairs.astype(np.uint64), 37)
    np.testing.assert_array_equal(instances.stream_merge(total, iter(pieces), batch=batch), expected)


def test_no_pairs_and_no_objects():
    assert instances.stream_merge(0, iter([np.zeros((0, 2), np.uint64)])).tolist() == [0]
    assert instances.stream_merge(3, iter([])).tolist() == [0, 1, 2, 3]


def test_segment_help_states_the_trade_off():
    from click.testing import CliRunner

    from unetflow.cli import main

    text = " ".join(CliRunner().invoke(main, ["segment", "--help"]).output.split())
    assert "--output instances" in text and "labels the instances once every part has finished" in text
