"""Issue 18: labels written into the input OME-Zarr's own ``labels`` group (OUTPUT = INPUT/labels/NAME).

Inputs are written by ome-zarr-py (odd shapes, so its coarser levels have scales like
2.0625) with a hand-made label ``cells`` of their own; outputs are read by
ome-zarr-models, ome-zarr-py's Reader, tensorstore and zarr-python. The oracle for the
input: a checksum of every file outside ``labels/`` (image arrays' chunks and metadata)
and of ``cells``, before and after.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from unetflow import resume
from unetflow.cli import main
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
from unetflow.errors import ConfigError, LockedError, OutputExistsError, OutputWriteError
from unetflow.formats import attach
from unetflow.model.testing import ScaleNetSource
from unetflow.run import segment

ome_writer = pytest.importorskip("ome_zarr.writer")
ome_format = pytest.importorskip("ome_zarr.format")
ome_io = pytest.importorskip("ome_zarr.io")
ome_reader = pytest.importorskip("ome_zarr.reader")
v05 = pytest.importorskip("ome_zarr_models.v05")
ts = pytest.importorskip("tensorstore")

SHAPE = (9, 33, 17)  # odd: ome-zarr-py's levels are 33 -> 16 -> 8 at scale 2.0625, 4.125


def write_input(path, *, channels=2, fmt=None):
    """An OME-Zarr image (C, Z, Y, X) in three levels with a label ``cells`` of its own, by ome-zarr-py."""
    _, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    fg = (np.sin(y / 4.0) * np.cos(x / 3.0) > 0.3).astype(np.float32)
    data = np.stack([1 - fg, fg] + [fg * 0] * (channels - 2))
    kwargs = {"fmt": fmt} if fmt else {}
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if fmt else 3)
    ome_writer.write_image(data, group, axes="czyx", scale_factors=(2, 4), storage_options={"chunks": (1, 4, 16, 16)}, **kwargs)
    cells = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 5).astype(np.uint8)
    ome_writer.write_labels(cells, group, name="cells", axes="zyx", scaler=None, scale_factors=(2, 4), **kwargs)
    return str(path)


def checksums(root, *, skip=()):
    """sha256 of every file under *root*, except under the relative folders in *skip*."""
    out = {}
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        if any(rel == s or rel.startswith(s + os.sep) for s in skip):
            continue
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
    return out


def image_sums(inp):
    """The input image (everything outside labels/) and its own label ``cells``."""
    return checksums(inp, skip=("labels",)), checksums(os.path.join(inp, "labels", "cells"))


def run(inp, out, *, kind="labels", level=None, overwrite=False, resume_=False, channels=2, dry_run=False):
    config = RunConfig(
        input=str(inp), output=str(out), model="(oracle)", level=level, resume=resume_, dry_run=dry_run,
        tiling=TilingSpec(block_shape=(4, 16, 16), patch_shape=(4, 8, 8), batch_size=8),
        output_settings=OutputSettings(kind=kind, overwrite=overwrite, chunk_shape=(4, 16, 16)),
        cluster=ClusterSpec(kind="inline"),
    )
    return segment(config, source=ScaleNetSource(factor=1.0, dims=3, channels=channels), progress=False)


def ome(path):
    return dict(zarr.open_group(str(path), mode="r").attrs)["ome"]


@pytest.fixture
def inp(tmp_path):
    return write_input(tmp_path / "raw.ome.zarr")


def test_labels_land_in_the_inputs_labels_group_and_the_image_is_untouched(inp, tmp_path):
    before = image_sums(inp)
    out = os.path.join(inp, "labels", "nuclei")
    run(inp, out)
    assert image_sums(inp) == before  # no chunk, no metadata of the image (or of its own label) changed
    assert ome(os.path.join(inp, "labels"))["labels"] == ["cells", "nuclei"]
    image = v05.Image.from_zarr(zarr.open_group(inp, mode="r"))  # validates: label levels == image levels, dtypes
    assert image.labels.label_paths == ["cells", "nuclei"]
    meta = ome(out)
    assert meta["image-label"]["source"] == {"image": "../../"} and meta["multiscales"][0]["name"] == "nuclei"
    source = ome(inp)["multiscales"][0]
    level0 = zarr.open_array(os.path.join(out, "0"), mode="r")[...]
    assert level0.max() == 1 and level0.shape == SHAPE
    for k, (ds, lds) in enumerate(zip(source["datasets"], meta["multiscales"][0]["datasets"])):
        img_t = {t["type"]: t[t["type"]][1:] for t in ds["coordinateTransformations"]}
        lab_t = {t["type"]: t[t["type"]] for t in lds["coordinateTransformations"]}
        assert lab_t["scale"] == img_t["scale"] and lab_t.get("translation", [0.0] * 3) == img_t.get("translation", [0.0] * 3)
        level = zarr.open_array(os.path.join(out, str(k)), mode="r")[...]
        assert level.shape == zarr.open_array(os.path.join(inp, ds["path"]), mode="r").shape[1:]
        idx = [attach.nearest_index(n0, 1.0, 0.0, n, s, t) for n0, n, s, t in
               zip(SHAPE, level.shape, lab_t["scale"], lab_t.get("translation", [0.0] * 3))]
        np.testing.assert_array_equal(level, level0[np.ix_(*idx)])  # nearest, never an invented label
    assert resume.RunDir(out).path == tmp_path / "raw.ome.zarr.labels-nuclei.unetflow"
    assert resume.RunDir(out).run_file.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in the store that is not Zarr (no run folder inside)
        arrays = [n for n, node in zarr.open_group(inp, mode="r").members(max_depth=None) if isinstance(node, zarr.Array)]
    assert "labels/nuclei/2" in arrays
    got = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(out, "0")}}).result().read().result()
    np.testing.assert_array_equal(got, level0)
    nodes = list(ome_reader.Reader(ome_io.parse_url(inp))())
    names = [n.metadata.get("name") for n in nodes if any("Label" in type(s).__name__ for s in n.specs)]
    assert {"cells", "nuclei"} <= set(names)


def test_instances_resume_and_the_lock_beside_the_input(tmp_path):
    inp = write_input(tmp_path / "objects.ome.zarr", channels=3)
    out = os.path.join(inp, "labels", "objects")
    before = image_sums(inp)
    run(inp, out, kind="instances", channels=3)
    assert image_sums(inp) == before
    assert not os.path.exists(out + ".instances-scratch") and not os.path.exists(str(tmp_path / "objects.ome.zarr.labels-objects.instances-scratch"))
    assert "colors" not in ome(out)["image-label"]  # the viewer's own colormap colours every object
    v05.Image.from_zarr(zarr.open_group(inp, mode="r"))
    report = run(inp, out, kind="instances", channels=3, resume_=False, overwrite=True)
    assert report.blocks_done > 0 and ome(os.path.join(inp, "labels"))["labels"] == ["cells", "objects"]


def test_resume_skips_done_blocks_and_a_live_lock_refuses(inp):
    out = os.path.join(inp, "labels", "nuclei")
    run(inp, out)
    report = run(inp, out, resume_=True)
    assert report.blocks_done == 0 and report.blocks_skipped > 0
    lock = resume.acquire(resume.RunDir(out), None, takeover=False)  # another run holds it
    try:
        with pytest.raises(LockedError, match="lock"):
            run(inp, out, resume_=True)
    finally:
        lock.release()


def test_an_existing_label_is_replaced_only_with_overwrite_and_only_that_group(inp):
    out = os.path.join(inp, "labels", "nuclei")
    run(inp, out)
    before = image_sums(inp)
    first = checksums(out)
    with pytest.raises(OutputExistsError, match="already exists; pass --resume to finish it, --overwrite"):
        run(inp, out)
    assert checksums(out) == first
    run(inp, out, overwrite=True)
    assert image_sums(inp) == before and ome(os.path.join(inp, "labels"))["labels"] == ["cells", "nuclei"]
    cells = os.path.join(inp, "labels", "cells")  # a label unetflow did not write is never removed
    with pytest.raises(OutputExistsError, match="never anything else"):
        run(inp, cells, overwrite=True)
    assert image_sums(inp) == before


def _protect(path):
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            p = os.path.join(folder, name)
            os.chmod(p, os.stat(p).st_mode & ~0o222)
    os.chmod(path, os.stat(path).st_mode & ~0o222)


def _unprotect(path):
    os.chmod(path, os.stat(path).st_mode | stat.S_IWUSR)
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            p = os.path.join(folder, name)
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)


@pytest.mark.parametrize("case, error, match", [
    # chmod a-w: refused even for root, who could write it anyway
    ("read-only", OutputWriteError, r"labels cannot be written into .*raw.ome.zarr: .*labels is write-protected \(mode dr-x.*chmod u\+w"),
    ("zarr-v2", ConfigError, r"Zarr v2 store \(OME-Zarr 0.4\).*unetflow convert"),
    ("plain-array", ConfigError, r"not an OME-Zarr image \(no multiscales"),
    ("level", ConfigError, r"with --level 1: a label image must have every level of its image.*leave out --level"),
    ("probabilities", ConfigError, r"--output probabilities is not a label image; pass --output labels"),
    ("other-image", ConfigError, r"lies in the labels group of .*other.ome.zarr, not of the input"),
])
def test_an_input_that_cannot_take_labels_is_refused_before_anything_is_written(tmp_path, case, error, match):
    inp = str(tmp_path / "raw.ome.zarr")
    kind, level, out = "labels", None, os.path.join(inp, "labels", "nuclei")
    if case == "zarr-v2":
        write_input(inp, fmt=ome_format.FormatV04())
    elif case == "plain-array":
        zarr.create_array(store=inp, shape=(2, *SHAPE), dtype="float32", chunks=(1, 4, 16, 16))
        os.makedirs(os.path.join(inp, "labels"))
        out = os.path.join(inp, "labels", "nuclei")
    else:
        write_input(inp)
    if case == "other-image":
        other = write_input(tmp_path / "other.ome.zarr")
        out = os.path.join(other, "labels", "nuclei")
    level = 1 if case == "level" else None
    kind = "probabilities" if case == "probabilities" else kind
    before = checksums(tmp_path)
    if case == "read-only":
        _protect(inp)
    try:
        with pytest.raises(error, match=match):
            run(inp, out, kind=kind, level=level)
    finally:
        _unprotect(inp)
    assert checksums(tmp_path) == before and not os.path.exists(out)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in ("raw.ome.zarr", "other.ome.zarr") if os.path.exists(tmp_path / n))


def test_read_only_image_without_labels_group_is_refused(tmp_path):
    inp = str(tmp_path / "raw.ome.zarr")
    write_input(inp)
    import shutil

    shutil.rmtree(os.path.join(inp, "labels"))
    os.chmod(inp, 0o555)
    try:
        with pytest.raises(OutputWriteError, match=r"raw.ome.zarr is write-protected \(mode dr-xr-xr-x\)"):
            run(inp, os.path.join(inp, "labels", "nuclei"))
    finally:
        os.chmod(inp, 0o755)
    assert not os.path.exists(os.path.join(inp, "labels"))


def test_cli_writes_into_the_input_and_prints_the_path_to_open(tmp_path):
    inp = str(tmp_path / "raw.ome.zarr")
    group = zarr.open_group(inp, mode="w")
    data = np.random.default_rng(0).random((1, *SHAPE)).astype(np.float32)
    ome_writer.write_image(data, group, axes="czyx", scale_factors=(2,), storage_options={"chunks": (1, 4, 16, 16)})
    model = str(tmp_path / "unet.pt")
    runner = CliRunner()
    assert runner.invoke(main, ["model", "init", model, "--dims", "3", "--padding", "same", "--depth", "1", "--width", "2"]).exit_code == 0
    out = os.path.join(inp, "labels", "seg")
    args = ["segment", inp, out, "--model", model, "--output", "labels", "--workers", "0", "--no-progress",
            "--block-shape", "4,16,16", "--patch-shape", "4,16,16", "--chunk-shape", "4,16,16"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"open it: napari --plugin napari-ome-zarr {inp}\n" in result.output
    assert f"report in {tmp_path / 'raw.ome.zarr.labels-seg.unetflow'}/" in result.output
    assert ome(os.path.join(inp, "labels"))["labels"] == ["seg"]
    os.chmod(os.path.join(inp, "labels"), 0o555)
    try:
        result = runner.invoke(main, [*args[:2], os.path.join(inp, "labels", "seg2"), *args[3:]])
    finally:
        os.chmod(os.path.join(inp, "labels"), 0o755)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "write-protected" in errors[0], result.output
    assert not os.path.exists(os.path.join(inp, "labels", "seg2"))
