"""Issue 15, items 1-2: nothing unetflow did not write is ever removed. One table of
commands: exit code, the message, and what must be unchanged on disk (by checksum)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_zarr
from unetflow.cli import main


def checksum(path):
    """Names and bytes of everything under *path* (a file or a folder), symlinks not followed."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            h.update(open(full, "rb").read())
    return h.hexdigest()


@pytest.fixture
def world(tmp_path):
    """An input, a model, a folder of the user's files, an empty folder, a text file."""
    runner = CliRunner()
    rng = np.random.default_rng(0)
    inp = write_zarr(tmp_path / "in.zarr", rng.integers(0, 1000, (8, 16, 16)).astype("uint16"))
    (tmp_path / "data").mkdir()
    nested = write_zarr(tmp_path / "data" / "in.zarr", rng.integers(0, 1000, (8, 16, 16)).astype("uint16"))
    model = str(tmp_path / "m.pt")
    assert runner.invoke(main, ["model", "init", model, "--dims", "3", "--depth", "1", "--width", "2"]).exit_code == 0
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my thesis")
    (user / "raw.tif").write_bytes(b"\x00" * 100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "readme.txt").write_text("not a model")
    os.symlink(inp, tmp_path / "link.zarr")
    return {"runner": runner, "tmp": tmp_path, "in": inp, "nested": nested, "model": model}


# (command after `unetflow`, exit code, words in the error line, paths that must be unchanged)
CASES = [
    ("segment {in} {in} --model {model} --overwrite", 1, ["is the input", "choose another output"], ["in.zarr"]),
    ("segment {in} {in}/pred.zarr --model {model} --overwrite", 1, ["lies inside the input"], ["in.zarr"]),
    ("segment {nested} {tmp}/data --model {model} --overwrite", 1, ["contains the input"], ["data"]),
    ("segment {in} {tmp}/link.zarr --model {model} --overwrite", 1, ["is the input"], ["in.zarr"]),
    ("segment {in} {model} --model {model} --overwrite", 1, ["is the model"], ["m.pt"]),
    ("segment {in} {tmp}/mine --model {model} --overwrite", 1, ["will not remove", "mine", "2 entries", "notes.txt"], ["mine"]),
    ("segment {in} {tmp}/mine --model {model}", 1, ["already exists", "--overwrite"], ["mine"]),
    ("segment {in} {tmp}/empty --model {model} --overwrite", 0, [], ["in.zarr"]),
    ("convert {in} {tmp}/mine --overwrite", 1, ["will not remove", "mine"], ["mine", "in.zarr"]),
    ("convert {in} {in} --overwrite", 1, ["is the input"], ["in.zarr"]),
    ("model init {tmp}/readme.txt --dims 3 --overwrite", 1, ["will not replace", "not a unetflow checkpoint"], ["readme.txt"]),
    ("model init {tmp}/mine --dims 3 --overwrite", 2, ["is a directory"], ["mine"]),  # click refuses a folder
    ("model init {model} --dims 3 --depth 1 --width 2 --overwrite", 0, [], ["in.zarr"]),
    ("sample {tmp}/mine --dims 2 --overwrite", 1, ["will not remove", "mine"], ["mine"]),
    ("train {in} {in} {tmp}/readme.txt --dims 3 --overwrite --no-progress", 1, ["will not replace", "not a unetflow checkpoint"], ["readme.txt"]),
]


@pytest.mark.parametrize("command, code, words, unchanged", CASES, ids=[c[0].split(" --")[0] for c in CASES])
def test_nothing_unetflow_did_not_write_is_removed(world, command, code, words, unchanged):
    tmp = world["tmp"]
    before = {p: checksum(tmp / p) for p in unchanged}
    args = command.format(**{k: v for k, v in world.items() if k != "runner"}).split()
    extra = ["--workers", "0", "--no-progress"] if args[0] == "segment" else []
    result = world["runner"].invoke(main, args + extra)
    assert result.exit_code == code, result.output
    if code == 2:  # a usage error from click
        assert all(word in result.output for word in words), result.output
    elif code:
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        for word in words:
            assert word in lines[0], (word, lines[0])
    for p in unchanged:
        assert checksum(tmp / p) == before[p], f"{p} changed"


def test_overwrite_replaces_what_unetflow_wrote(world):
    """A previous unetflow output (plain and OME-Zarr), a sample and a checkpoint are replaced."""
    runner, tmp = world["runner"], world["tmp"]
    for out in ("p.zarr", "p.ome.zarr"):
        for _ in range(2):
            r = runner.invoke(main, ["segment", world["in"], str(tmp / out), "--model", world["model"], "--overwrite",
                                     "--workers", "0", "--no-progress"])
            assert r.exit_code == 0, r.output
    for _ in range(2):
        assert runner.invoke(main, ["sample", str(tmp / "s.zarr"), "--dims", "2", "--overwrite"]).exit_code == 0
