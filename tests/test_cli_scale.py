"""`unetflow segment --config/--resume/--part` with a real (untrained) U-Net checkpoint."""

from __future__ import annotations

import json
import textwrap

import pytest
import zarr
from click.testing import CliRunner

from conftest import random_image, write_zarr
from unetflow.cli import main
from unetflow.resume import RunDir

pytest.importorskip("unetflow.model.checkpoint")


@pytest.fixture
def setup(tmp_path):
    runner = CliRunner()
    model = str(tmp_path / "unet.pt")
    for path, seed in ((model, "0"), (str(tmp_path / "other.pt"), "1")):
        result = runner.invoke(main, ["model", "init", path, "--dims", "3", "--depth", "1", "--width", "2", "--seed", seed])
        assert result.exit_code == 0, result.output
    inp = write_zarr(tmp_path / "raw.zarr", random_image((12, 20, 12)))
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent("""
        cluster: inline
        tiling: {block_shape: "8,8,8", patch_shape: "8,8,8"}
        output: {chunk_shape: "8,8,8"}
        device: cpu
    """))
    return runner, model, inp, str(config)


def segment(runner, *args):
    return runner.invoke(main, ["segment", *map(str, args), "--no-progress"])


def test_config_flags_resume_and_parts(tmp_path, setup):
    runner, model, inp, config = setup
    out = tmp_path / "pred.zarr"
    result = segment(runner, inp, out, "--model", model, "--config", config)
    assert result.exit_code == 0, result.output
    attrs = zarr.open_array(str(out)).attrs["unetflow"]["config"]
    assert attrs["tiling"]["block_shape"] == [8, 8, 8] and attrs["cluster"]["kind"] == "inline"
    assert json.loads(RunDir(str(out)).report_file().read_text())["blocks"]["done"] == 2 * 3 * 2
    # a flag typed on the command line wins over the config file, the rest still comes from it
    result = segment(runner, inp, tmp_path / "big.zarr", "--model", model, "--config", config, "--block-shape", "16,16,16", "--chunk-shape", "16,16,16")
    assert result.exit_code == 0, result.output
    attrs = zarr.open_array(str(tmp_path / "big.zarr")).attrs["unetflow"]["config"]
    assert attrs["tiling"]["block_shape"] == [16, 16, 16] and attrs["tiling"]["patch_shape"] == [8, 8, 8]
    # an existing output needs --resume; resuming a finished one does nothing
    result = segment(runner, inp, out, "--model", model, "--config", config)
    assert result.exit_code == 1 and "pass --resume to finish it" in result.output
    result = segment(runner, inp, out, "--model", model, "--config", config, "--resume")
    assert result.exit_code == 0 and "0 blocks, 12 already done" in result.output
    result = segment(runner, inp, out, "--model", str(tmp_path / "other.pt"), "--config", config, "--resume")
    assert result.exit_code == 1 and "other settings or another model" in result.output and "model.sha256" in result.output
    # two parts write one output, equal to the single run
    for part in ("2/2", "1/2"):
        result = segment(runner, inp, tmp_path / "parts.zarr", "--model", model, "--config", config, "--part", part)
        assert result.exit_code == 0, result.output
    assert zarr.open_array(str(tmp_path / "parts.zarr"))[:].tobytes() == zarr.open_array(str(out))[:].tobytes()
    result = segment(runner, inp, tmp_path / "x.zarr", "--model", model, "--part", "3/2")
    assert result.exit_code == 1 and "1 <= i <= n" in result.output
