"""The command line through CliRunner: happy paths and every bad input, one line, exit != 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import write_zarr
from unetflow.cli import main
from unetflow.resume import RunDir


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def model3d(tmp_path, runner):
    path = str(tmp_path / "unet.pt")
    result = runner.invoke(main, ["model", "init", path, "--dims", "3", "--padding", "same", "--depth", "2", "--width", "4"])
    assert result.exit_code == 0, result.output
    return path


def error_line(result):
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_help_is_fast_and_states_tradeoffs(runner):
    result = runner.invoke(main, ["segment", "--help"])
    assert result.exit_code == 0
    assert "more memory" in result.output and "--dry-run" in result.output


def test_model_init_and_info(runner, tmp_path):
    path = str(tmp_path / "v.pt")
    assert runner.invoke(main, ["model", "init", path, "--dims", "2", "--padding", "valid", "--depth", "2", "--width", "4"]).exit_code == 0
    result = runner.invoke(main, ["model", "info", path])
    assert result.exit_code == 0, result.output
    assert "margin" in result.output and "input_multiple" in result.output and "receptive" in result.output
    again = runner.invoke(main, ["model", "init", path])
    assert again.exit_code == 1 and "--overwrite" in error_line(again)


def test_info(runner, image3d):
    inp, _ = image3d
    result = runner.invoke(main, ["info", inp])
    assert result.exit_code == 0 and "(19, 33, 17)" not in result.output and "[19, 33, 17]" in result.output


def test_segment_dry_run_writes_nothing(runner, tmp_path, image3d, model3d):
    inp, _ = image3d
    out = tmp_path / "pred.zarr"
    result = runner.invoke(main, ["segment", inp, str(out), "--model", model3d, "--dry-run", "--block-shape", "8,16,8", "--patch-shape", "8,8,8"])
    assert result.exit_code == 0, result.output
    assert "redundancy" in result.output and "memory_per_worker_mb" in result.output and "blocks" in result.output
    assert not out.exists()


def test_segment_labels_inline(runner, tmp_path, image3d, model3d):
    inp, _ = image3d
    out = str(tmp_path / "pred.zarr")
    args = ["segment", inp, out, "--model", model3d, "--workers", "0", "--block-shape", "16,16,16", "--patch-shape", "8,8,8", "--output", "labels", "--no-progress"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    labels = zarr.open_array(out)
    assert labels.shape == (19, 33, 17) and labels.dtype == np.uint8 and set(np.unique(labels[:])) <= {0, 1}
    again = runner.invoke(main, args)
    assert again.exit_code == 1 and "already exists" in error_line(again)
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0


@pytest.mark.parametrize("flag", ["--processes", "--threads"])
def test_segment_processes_flag(runner, tmp_path, image3d, model3d, flag):
    """One worker runs in this process unless --processes asks for a process of its own."""
    import json
    import os

    inp, _ = image3d
    out = tmp_path / "pred.zarr"
    args = ["segment", inp, str(out), "--model", model3d, "--block-shape", "16,16,16", "--patch-shape", "8,8,8", "--no-progress", flag]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert zarr.open_array(str(out)).attrs["unetflow"]["config"]["cluster"]["processes"] is (flag == "--processes")
    workers = json.loads(RunDir(str(out)).report_file().read_text())["workers"]
    assert any(name.endswith(f":{os.getpid()}") for name in workers) is (flag == "--threads"), workers


def bad_cases(tmp_path, inp, model):
    wrong_ndim = write_zarr(tmp_path / "4d.zarr", np.zeros((2, 2, 4, 4, 4), "u1"))
    two_channels = write_zarr(tmp_path / "c2.zarr", np.zeros((2, 8, 8, 8), "u1"))
    not_zarr = tmp_path / "plain"
    not_zarr.mkdir(exist_ok=True)
    broken_model = tmp_path / "broken.pt"
    broken_model.write_bytes(b"not a checkpoint")
    misfit = tmp_path / "misfit.pt"
    ckpt = torch.load(model, weights_only=True)
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    torch.save(ckpt, misfit)
    existing = write_zarr(tmp_path / "exists.zarr", np.ones((2, 2), "u1"))
    out = str(tmp_path / "out.zarr")
    return [
        # (args, words the one-line message must contain)
        ([str(tmp_path / "missing.zarr"), out, "--model", model], ["missing.zarr", "does not exist"]),
        ([str(not_zarr), out, "--model", model], ["plain", "not a Zarr array"]),
        ([wrong_ndim, out, "--model", model], ["5 axes", "3-D"]),
        ([two_channels, out, "--model", model], ["2 channel", "takes 1"]),
        ([inp, out, "--model", str(tmp_path / "nomodel.pt")], ["nomodel.pt"]),
        ([inp, out, "--model", str(broken_model)], ["broken.pt"]),
        ([inp, out, "--model", str(misfit)], ["misfit.pt", "missing"]),
        ([inp, out, "--model", model, "--block-shape", "0,8,8"], ["block shape", "positive"]),
        ([inp, out, "--model", model, "--patch-shape", "6,6,6"], ["6", "depth 2"]),
        ([inp, out, "--model", model, "--block-shape", "12,12,12", "--chunk-shape", "8,8,8"], ["not a multiple", "--block-shape"]),
        ([inp, out, "--model", model, "--blend", "crop", "--halo", "1,1,1", "--patch-shape", "16,16,16"], ["halo", "receptive radius"]),
        ([inp, existing, "--model", model], ["exists.zarr", "--overwrite"]),
        # a --dtype the output cannot be written in: refused before any work
        ([inp, out, "--model", model, "--dtype", "int8"], ["probability dtype", "int8"]),
        ([inp, out, "--model", model, "--output", "labels", "--dtype", "float32"], ["labels dtype", "unsigned"]),
        ([inp, out, "--model", model, "--output", "instances", "--dtype", "uint8"], ["--dtype uint8", "uint64"]),
    ]


def test_bad_input_one_line_nonzero_nothing_written(runner, tmp_path, image3d, model3d):
    inp, _ = image3d
    for args, words in bad_cases(tmp_path, inp, model3d):
        result = runner.invoke(main, ["segment", *args, "--workers", "0", "--no-progress"])
        assert result.exit_code == 1, (args, result.output)
        line = error_line(result)
        for word in words:
            assert word in line, (word, line)
        assert not (tmp_path / "out.zarr").exists(), args
    assert zarr.open_array(str(tmp_path / "exists.zarr"))[:].sum() == 4  # untouched
