"""Issue 15: every bad input and fault, good and bad, as one table.

Each row is a command (``unetflow ...`` through CliRunner), the exit code, a pattern
its one ``error:`` line must match (``None``: it must succeed), and the paths that must
be unchanged on disk afterwards (checked by checksum). No row may print a traceback.
Rows run in order on one shared folder (module scope): a row that succeeds may leave
an output behind that a later row uses (the resume and lock rows).

The disk-full and read-only rows need a file system the test can mount (tmpfs, as
root); they skip, saying why, where it cannot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import random_image, write_zarr
from unetflow import resume
from unetflow.cli import main

FAST = ["--workers", "0", "--no-progress", "--block-shape", "16,16,16", "--patch-shape", "8,8,8"]
FAST2 = ["--workers", "0", "--no-progress"]
WHOLE = "."  # "unchanged: the whole shared folder"


@dataclass(frozen=True)
class Row:
    name: str
    args: list[str]  # "{w}" is the shared folder
    code: int
    pattern: str | None  # regex the error line must match; None: no error line
    unchanged: tuple[str, ...] = (WHOLE,)
    check: str = ""  # an extra check by name, see CHECKS
    skip: str = ""  # a reason to skip, decided when the table is built
    env: dict[str, str] = field(default_factory=dict)


class Pickled:
    """Unpickling this (unsafely) would create a file: a safe load must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def checksum(path: Path) -> str:
    """sha256 over every file's relative name and bytes under *path* (or of the file)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("world")
    runner = CliRunner()
    for name, dims in (("m3.pt", "3"), ("m2.pt", "2")):
        r = runner.invoke(main, ["model", "init", str(w / name), "--dims", dims, "--depth", "2", "--width", "4"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["model", "init", str(w / "other.pt"), "--dims", "3", "--depth", "2", "--width", "4", "--seed", "1"])
    assert r.exit_code == 0, r.output
    image = random_image((19, 33, 17))
    write_zarr(w / "in.zarr", image)
    write_zarr(w / "in2d.zarr", random_image((37, 45)))
    g = zarr.open_group(str(w / "group.zarr"), mode="w")
    g.create_array("raw", data=random_image((8, 8)), chunks=(8, 8))
    write_zarr(w / "4d.zarr", np.zeros((2, 4, 4, 4), "u1"))
    write_zarr(w / "c2.zarr", np.zeros((2, 8, 8, 8), "u1"))
    write_zarr(w / "bool.zarr", np.random.default_rng(0).random((20, 24)) > 0.5)
    for dtype in ("float16", "int64", "uint64"):
        write_zarr(w / f"{dtype}.zarr", random_image((20, 24), dtype="uint16").astype(dtype))
    write_zarr(w / "one.zarr", np.ones((1, 1), "u2"))
    write_zarr(w / "corrupt.zarr", image)
    (w / "corrupt.zarr" / "c" / "1" / "1" / "1").write_bytes(b"garbage" * 3)
    zarr.create_array(store=str(w / "zero.zarr"), shape=(0, 33, 17), dtype="u2", chunks=(8, 8, 8))
    zarr.create_array(store=str(w / "complex.zarr"), shape=(8, 8, 8), dtype="complex64", chunks=(8, 8, 8))
    nan = random_image((19, 33, 17), dtype="float32")
    nan[3, 4, 5], nan[5, 5, 5] = np.nan, np.inf
    write_zarr(w / "nan.zarr", nan)
    write_zarr(w / "allnan.zarr", np.full((19, 33, 17), np.nan, "float32"))
    hidden = random_image((40, 64, 64), dtype="float32")
    hidden[0, 0, 8] = np.nan  # in chunk 1 of 640: not among the 64 the statistics sample
    write_zarr(w / "hidden.zarr", hidden, chunks=(4, 8, 8))
    model = w / "m3.pt"
    (w / "truncated.pt").write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    ckpt = torch.load(model, weights_only=True)
    evil = dict(ckpt, extra={"x": Pickled(str(w / "pwned"))})
    torch.save(evil, w / "pickle.pt")
    torch.save(evil, w / "evil.last.pt")  # what train --resume of evil.pt reads
    misfit = dict(ckpt, state_dict=dict(list(ckpt["state_dict"].items())[1:]))
    torch.save(misfit, w / "misfit.pt")
    torch.save(dict(ckpt, spec=dict(ckpt["spec"], dims=4)), w / "dims4.pt")
    write_zarr(w / "exists.zarr", np.ones((2, 2), "u1"))
    (w / "userdir").mkdir()
    (w / "userdir" / "notes.txt").write_text("my notes")
    (w / "userfile.pt").write_text("not a checkpoint")
    (w / "empty").mkdir()
    (w / "raw_link.zarr").symlink_to(w / "in.zarr")
    write_zarr(w / "labels.zarr", (random_image((37, 45)) > 2000).astype("u2"))
    (w / "busy.zarr.instances-scratch").mkdir()
    (w / "busy.zarr.instances-scratch" / "mine.txt").write_text("user data")
    r = runner.invoke(main, ["convert", str(w / "in.zarr"), str(w / "converted.zarr"), "--no-progress"])
    assert r.exit_code == 0, r.output
    return w


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _no_cuda(n: int = 1) -> str:
    return "" if (torch.cuda.device_count() if torch.cuda.is_available() else 0) < n else f"this machine has {n} or more GPUs"


M3 = ["--model", "{w}/m3.pt"]
M2 = ["--model", "{w}/m2.pt"]
TABLE = [
    # --- kept as they were: missing things, wrong arrays, wrong shapes -------------------
    Row("missing input", ["segment", "{w}/missing.zarr", "{w}/o.zarr", *M3, *FAST], 1, r"missing\.zarr does not exist"),
    Row("missing model", ["segment", "{w}/in.zarr", "{w}/o.zarr", "--model", "{w}/nomodel.pt", *FAST], 1, r"nomodel\.pt does not exist"),
    Row("missing array in store", ["segment", "{w}/group.zarr/nope", "{w}/o.zarr", *M2, *FAST2], 1, r"group\.zarr/nope"),
    Row("group, not array", ["segment", "{w}/group.zarr", "{w}/o.zarr", *M2, *FAST2], 1, r"is a Zarr group.*group\.zarr/raw"),
    Row("4-D input, 2-D model", ["segment", "{w}/4d.zarr", "{w}/o.zarr", *M2, *FAST2], 1, r"4 axes.*2-D"),
    Row("2-D input, 3-D model", ["segment", "{w}/in2d.zarr", "{w}/o.zarr", *M3, *FAST], 1, r"2 axes.*3-D"),
    Row("channel mismatch", ["segment", "{w}/c2.zarr", "{w}/o.zarr", *M3, *FAST], 1, r"2 channel.*takes 1"),
    Row("corrupt chunk", ["segment", "{w}/corrupt.zarr", "{w}/o_corrupt.zarr", *M3, "--no-progress", "--block-shape", "16,16,16",
                          "--patch-shape", "8,8,8"], 1, r"does not decode in box \[\(8, 16\).*Zstd", unchanged=("corrupt.zarr",)),
    Row("truncated checkpoint", ["segment", "{w}/in.zarr", "{w}/o.zarr", "--model", "{w}/truncated.pt", *FAST], 1, r"truncated\.pt cannot be loaded"),
    Row("pickle: segment", ["segment", "{w}/in.zarr", "{w}/o.zarr", "--model", "{w}/pickle.pt", *FAST], 1, r"pickle\.pt.*pickled", check="not_pwned"),
    Row("pickle: model info", ["model", "info", "{w}/pickle.pt"], 1, r"pickle\.pt.*pickled", check="not_pwned"),
    Row("pickle: train --init", ["train", "{w}/in2d.zarr", "{w}/labels.zarr", "{w}/t.pt", "--init", "{w}/pickle.pt", "--epochs", "1",
                                 "--steps", "1", "--no-progress"], 1, r"pickle\.pt.*pickled", check="not_pwned"),
    Row("pickle: train --resume", ["train", "{w}/in2d.zarr", "{w}/labels.zarr", "{w}/evil.pt", "--resume", "--epochs", "1",
                                   "--no-progress"], 1, r"evil\.last\.pt.*pickled", check="not_pwned"),
    Row("weights misfit", ["segment", "{w}/in.zarr", "{w}/o.zarr", "--model", "{w}/misfit.pt", *FAST], 1, r"misfit\.pt weights do not fit"),
    Row("dims 4", ["segment", "{w}/in.zarr", "{w}/o.zarr", "--model", "{w}/dims4.pt", *FAST], 1, r"dims4\.pt.*dims 4"),
    Row("zero block", ["segment", "{w}/in.zarr", "{w}/o.zarr", *M3, *FAST, "--block-shape", "0,16,16"], 1, r"block shape.*positive"),
    Row("negative patch", ["segment", "{w}/in.zarr", "{w}/o.zarr", *M3, *FAST, "--patch-shape", "-8,8,8"], 1, r"patch shape.*positive"),
    Row("mis-sized patch", ["segment", "{w}/in.zarr", "{w}/o.zarr", *M3, *FAST, "--patch-shape", "6,6,6"], 1, r"6.*depth 2"),
    Row("2-axis block", ["segment", "{w}/in.zarr", "{w}/o.zarr", *M3, *FAST, "--block-shape", "16,16"], 1, r"block shape.*2 axes"),
    Row("zero chunk", ["segment", "{w}/in.zarr", "{w}/o.zarr", *M3, *FAST, "--chunk-shape", "0,8,8"], 1, r"chunk shape.*positive"),
    Row("chunk not dividing block", ["segment", "{w}/in.zarr", "{w}/o.zarr", *M3, *FAST, "--block-shape", "12,12,12",
                                     "--chunk-shape", "8,8,8"], 1, r"not a multiple.*--block-shape"),
    Row("existing output", ["segment", "{w}/in.zarr", "{w}/exists.zarr", *M3, *FAST], 1, r"exists\.zarr already exists.*--overwrite"),
    Row("bool input", ["segment", "{w}/bool.zarr", "{w}/o_bool.zarr", *M2, *FAST2], 0, None, unchanged=("bool.zarr",)),
    Row("float16 input", ["segment", "{w}/float16.zarr", "{w}/o_f16.zarr", *M2, *FAST2], 0, None, unchanged=("float16.zarr",)),
    Row("int64 input", ["segment", "{w}/int64.zarr", "{w}/o_i64.zarr", *M2, *FAST2], 0, None, unchanged=("int64.zarr",)),
    Row("uint64 input", ["segment", "{w}/uint64.zarr", "{w}/o_u64.zarr", *M2, *FAST2], 0, None, unchanged=("uint64.zarr",)),
    Row("1x1 image", ["segment", "{w}/one.zarr", "{w}/o_one.zarr", *M2, *FAST2], 0, None, unchanged=("one.zarr",)),
    # --- item 1: nothing unetflow did not write is removed ----------------------------
    Row("output is input", ["segment", "{w}/in.zarr", "{w}/in.zarr", *M3, *FAST, "--overwrite"], 1, r"output .*in\.zarr is the input"),
    Row("output is input via symlink", ["segment", "{w}/in.zarr", "{w}/raw_link.zarr", *M3, *FAST, "--overwrite"], 1, r"raw_link\.zarr is the input"),
    Row("output inside input", ["segment", "{w}/in.zarr", "{w}/in.zarr/pred.zarr", *M3, *FAST, "--overwrite"], 1, r"lies inside the input"),
    Row("output contains input", ["segment", "{w}/in.zarr", "{w}", *M3, *FAST, "--overwrite"], 1, r"contains the input"),
    Row("output is the model", ["segment", "{w}/in.zarr", "{w}/m3.pt", *M3, *FAST, "--overwrite"], 1, r"m3\.pt is the model"),
    Row("overwrite user folder", ["segment", "{w}/in.zarr", "{w}/userdir", *M3, *FAST, "--overwrite"], 1,
        r"userdir exists and is a folder of 1 entry \(notes\.txt\) that unetflow did not write; --overwrite removes only outputs of unetflow segment"),
    Row("overwrite user store", ["segment", "{w}/in.zarr", "{w}/exists.zarr", *M3, *FAST, "--overwrite"], 1, r"a Zarr store that unetflow did not write"),
    Row("overwrite user file", ["segment", "{w}/in.zarr", "{w}/userfile.pt", *M3, *FAST, "--overwrite"], 1, r"userfile\.pt exists and is a file of 16 bytes"),
    Row("overwrite a converted store", ["segment", "{w}/in.zarr", "{w}/converted.zarr", *M3, *FAST, "--overwrite"], 1,
        r"is one of the stores written by unetflow convert"),
    Row("overwrite an empty folder", ["segment", "{w}/in.zarr", "{w}/empty", *M3, *FAST, "--overwrite"], 0, None, unchanged=("in.zarr",)),
    Row("make an output", ["segment", "{w}/in.zarr", "{w}/pred.zarr", *M3, *FAST], 0, None, unchanged=("in.zarr",)),
    Row("overwrite own output", ["segment", "{w}/in.zarr", "{w}/pred.zarr", *M3, *FAST, "--overwrite"], 0, None, unchanged=("in.zarr",),
        check="completed:pred.zarr"),
    Row("instances scratch taken", ["segment", "{w}/in.zarr", "{w}/busy.zarr", *M3, *FAST, "--output", "instances"], 1,
        r"instances scratch .*busy\.zarr\.instances-scratch exists and is a folder of 1 entry"),
    # --- issue 16: instances need an instance model; evaluate needs one shape ------------
    Row("instances from a non-instance model", ["segment", "{w}/in.zarr", "{w}/o_inst.zarr", *M3, *FAST, "--output", "instances"], 1,
        r"--output instances needs a model with the classes background, interior, border, but model .*m3\.pt has 2 classes "
        r"\(unnamed\); train one .*--targets instances"),
    Row("evaluate, other shapes", ["evaluate", "{w}/one.zarr", "{w}/labels.zarr"], 1,
        r"prediction .*one\.zarr has shape \(1, 1\) \(labels\) but truth .*labels\.zarr has shape \(37, 45\)"),
    Row("convert over user folder", ["convert", "{w}/in.zarr", "{w}/userdir", "--overwrite", "--no-progress"], 1, r"userdir exists and is a folder"),
    Row("convert over itself", ["convert", "{w}/in.zarr", "{w}/in.zarr", "--overwrite", "--no-progress"], 1, r"is the input"),
    Row("convert over own", ["convert", "{w}/in.zarr", "{w}/converted.zarr", "--overwrite", "--no-progress"], 0, None, unchanged=("in.zarr", "converted.zarr")),
    Row("convert over a segment output", ["convert", "{w}/in.zarr", "{w}/pred.zarr", "--overwrite", "--no-progress"], 1, r"outputs of unetflow segment"),
    Row("model init over user file", ["model", "init", "{w}/userfile.pt", "--overwrite"], 1, r"userfile\.pt exists and is a file of 16 bytes that is not a unetflow checkpoint"),
    Row("model init over folder", ["model", "init", "{w}/userdir", "--overwrite"], 2, r"Error: .*userdir' is a directory"),  # click refuses it
    Row("model init over own", ["model", "init", "{w}/other.pt", "--overwrite", "--seed", "1", "--depth", "2", "--width", "4"], 0, None,
        unchanged=("in.zarr",)),
    Row("train over user file", ["train", "{w}/in2d.zarr", "{w}/labels.zarr", "{w}/userfile.pt", "--overwrite", "--epochs", "1", "--steps", "1",
                                 "--no-progress"], 1, r"userfile\.pt exists and is a file .* not a unetflow checkpoint"),
    Row("train onto its input", ["train", "{w}/in2d.zarr", "{w}/labels.zarr", "{w}/in2d.zarr", "--overwrite", "--no-progress"], 1, r"is the image"),
    Row("sample over user folder", ["sample", "{w}/userdir", "--overwrite", "--dims", "2", "--shape", "16,16"], 1, r"userdir exists and is a folder"),
    # --- items 2 and 6: settings checked before any work ------------------------------
    Row("cuda without CUDA", ["segment", "{w}/in.zarr", "{w}/o.zarr", *M3, "--device", "cuda", "--no-progress"], 1,
        r"--device cuda but CUDA is not available.*--device cpu", skip=_no_cuda()),
    Row("unknown device", ["segment", "{w}/in.zarr", "{w}/o.zarr", *M3, "--device", "junk", "--no-progress"], 1, r"device 'junk' is not one of"),
    Row("more GPUs than visible", ["segment", "{w}/in.zarr", "{w}/o.zarr", *M3, "--gpus", "4", "--no-progress"], 1,
        r"--gpus 4 but CUDA sees \d GPUs?.*use ", skip=_no_cuda(4)),
    Row("train on cuda without CUDA", ["train", "{w}/in2d.zarr", "{w}/labels.zarr", "{w}/t.pt", "--device", "cuda", "--no-progress"], 1,
        r"--device cuda but CUDA is not available", skip=_no_cuda()),
    Row("zero-size input", ["segment", "{w}/zero.zarr", "{w}/o.zarr", *M3, *FAST], 1, r"shape \(0, 33, 17\), an axis of length 0"),
    Row("complex input", ["segment", "{w}/complex.zarr", "{w}/o.zarr", *M3, *FAST], 1, r"dtype complex64, not real numbers"),
    # --- item 3: NaN and Inf ------------------------------------------------------------
    Row("NaN refused", ["segment", "{w}/nan.zarr", "{w}/o.zarr", *M3, *FAST], 1, r"NaN or Inf values: 2 of the 10659 sampled voxels.*--nan-value"),
    Row("all NaN refused", ["segment", "{w}/allnan.zarr", "{w}/o.zarr", *M3, *FAST], 1, r"all 10659 sampled voxels.*--nan-value"),
    Row("NaN replaced", ["segment", "{w}/nan.zarr", "{w}/o_nan.zarr", *M3, *FAST, "--nan-value", "0"], 0, None, unchanged=("nan.zarr",),
        check="finite:o_nan.zarr"),
    Row("all NaN replaced", ["segment", "{w}/allnan.zarr", "{w}/o_allnan.zarr", *M3, *FAST, "--nan-value", "0"], 0, None,
        unchanged=("allnan.zarr",), check="finite:o_allnan.zarr"),
    Row("NaN the sample missed", ["segment", "{w}/hidden.zarr", "{w}/o_hidden.zarr", *M3, "--no-progress", "--block-shape", "16,16,16",
                                  "--patch-shape", "8,8,8"], 1, r"hidden\.zarr has 1 NaN or Inf voxels in box offset \[-?\d+, .*--nan-value",
        unchanged=("hidden.zarr",), check="no_lock:o_hidden.zarr"),
    Row("NaN the sample missed, replaced", ["segment", "{w}/hidden.zarr", "{w}/o_hidden2.zarr", *M3, *FAST, "--nan-value", "0"], 0, None,
        unchanged=("hidden.zarr",), check="finite:o_hidden2.zarr"),
    Row("infinite --nan-value", ["segment", "{w}/nan.zarr", "{w}/o.zarr", *M3, *FAST, "--nan-value", "inf"], 1, r"--nan-value inf must be a finite number"),
    # --- resume and locks (kept) --------------------------------------------------------
    Row("resume, other model", ["segment", "{w}/in.zarr", "{w}/pred.zarr", "--model", "{w}/other.pt", *FAST, "--resume"], 1,
        r"other settings or another model \(model\.sha256"),
    Row("resume, other settings", ["segment", "{w}/in.zarr", "{w}/pred.zarr", *M3, *FAST, "--resume", "--overlap", "0.5"], 1,
        r"other settings or another model \(settings\.tiling\.overlap: was 0\.25, now 0\.5"),
    Row("stale lock, no resume", ["segment", "{w}/in.zarr", "{w}/pred.zarr", *M3, *FAST], 1, r"stale lock of a dead run.*--resume",
        check="stale_lock"),
    Row("stale lock, resume", ["segment", "{w}/in.zarr", "{w}/pred.zarr", *M3, *FAST, "--resume"], 0, None, unchanged=("in.zarr",),
        check="completed:pred.zarr"),
]


def _prepare(row: Row, w: Path) -> None:
    if row.check == "stale_lock":  # a run killed mid-way: its lock (a dead pid) and two markers gone
        run_dir = resume.RunDir(str(w / "pred.zarr"))
        for marker in sorted(run_dir.done_dir.iterdir())[:2]:
            marker.unlink()
        holder = {"host": socket.gethostname(), "pid": dead_pid(), "started": "earlier", "token": "dead", "part": None}
        run_dir.lock_file().write_text(json.dumps(holder))


def _check(row: Row, w: Path) -> None:
    kind, _, arg = row.check.partition(":")
    if kind == "not_pwned":
        assert not (w / "pwned").exists(), "a pickled object was executed"
    elif kind == "finite":
        assert np.isfinite(zarr.open_array(str(w / arg))[:]).all()
    elif kind == "no_lock":
        assert not resume.RunDir(str(w / arg)).lock_file().exists(), "the lock was not released"
    elif kind == "completed":
        run_dir = resume.RunDir(str(w / arg))
        assert json.loads(run_dir.report_file().read_text())["status"] == "complete"
        assert not run_dir.lock_file().exists()
        assert len(run_dir.done_blocks()) == 2 * 3 * 2


@pytest.mark.parametrize("row", TABLE, ids=[r.name for r in TABLE])
def test_table(world, row, capfd):
    if row.skip:
        pytest.skip(row.skip)
    w = world
    _prepare(row, w)
    paths = [w if u == WHOLE else w / u for u in row.unchanged]
    before = [checksum(p) for p in paths]
    args = [a.replace("{w}", str(w)) for a in row.args]
    result = CliRunner().invoke(main, args)
    console = result.output + "".join(capfd.readouterr())
    assert result.exit_code == row.code, (row.name, console, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith(("error:", "Error:"))]  # ours, or click's usage errors
    if row.pattern is None:
        assert not errors, console
    else:
        assert len(errors) == 1, console
        assert re.search(row.pattern, errors[0]), (row.pattern, errors[0])
    assert "Traceback" not in console and "Compute Failed" not in console, console
    for p, digest in zip(paths, before):
        assert checksum(p) == digest, f"{row.name}: {p} changed"
    _check(row, w)


# --- item 4: faults during a run, on a small file system the test mounts --------------


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 600 KiB at tmp_path/mnt, unmounted afterwards; skips where it cannot be mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root (mount -t tmpfs); this test runs as an ordinary user")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN in this container?): {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_midway_then_resume_is_bit_identical(tmp_path, small_fs, capfd):
    """The output's file system fills after a few blocks: one line naming the block and
    the cause, the lock released, markers only for blocks whose chunks all landed; after
    space is freed --resume finishes with the bytes of an uninterrupted run."""
    w = tmp_path
    runner = CliRunner()
    assert runner.invoke(main, ["model", "init", str(w / "m.pt"), "--dims", "3", "--depth", "2", "--width", "4"]).exit_code == 0
    write_zarr(w / "big.zarr", random_image((32, 64, 64)), chunks=(16, 32, 32))
    args = [str(w / "big.zarr"), None, "--model", str(w / "m.pt"), "--no-progress", "--block-shape", "16,32,32", "--patch-shape", "16,16,16"]
    out = small_fs / "pred.zarr"
    result = runner.invoke(main, ["segment", *[str(out) if a is None else a for a in args]])
    console = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 1, console
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(r"block \d+ \(write box .*\) could not write the output: No space left on device .*--resume", errors[0]), console
    assert "Traceback" not in console and "Compute Failed" not in console, console
    run_dir = resume.RunDir(str(out))
    assert not run_dir.lock_file().exists()
    done = run_dir.done_blocks()
    assert 0 < len(done) < 8, done
    arr = zarr.open_array(str(out))
    boxes = {b: (slice(None),) + tuple(slice(i * n, (i + 1) * n) for i, n in zip(np.unravel_index(b, (2, 2, 2)), (16, 32, 32))) for b in done}
    landed = {b: arr[box] for b, box in boxes.items()}  # a marked block's chunks all decode
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    resumed = runner.invoke(main, ["segment", *[str(out) if a is None else a for a in args], "--resume"])
    assert resumed.exit_code == 0, resumed.output
    ref = w / "ref.zarr"
    assert runner.invoke(main, ["segment", *[str(ref) if a is None else a for a in args]]).exit_code == 0
    a, b = zarr.open_array(str(out))[:], zarr.open_array(str(ref))[:]
    assert a.tobytes() == b.tobytes()
    for block, data in landed.items():  # and held the final bytes already
        assert data.tobytes() == b[boxes[block]].tobytes(), block


def test_read_only_location_refused_before_work(tmp_path, small_fs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    write_zarr(tmp_path / "in.zarr", random_image((8, 16, 16)))
    runner = CliRunner()
    assert runner.invoke(main, ["model", "init", str(tmp_path / "m.pt"), "--dims", "3", "--depth", "2", "--width", "4"]).exit_code == 0
    result = runner.invoke(main, ["segment", str(tmp_path / "in.zarr"), str(small_fs / "o.zarr"), "--model", str(tmp_path / "m.pt"), *FAST])
    assert result.exit_code == 1
    assert "read-only file system (errno 30)" in result.output and "Traceback" not in result.output
    assert not os.listdir(small_fs)
