"""Issue 19: bioimage.io model packages, both directions, offline.

Export: unetflow's demo model becomes a package that bioimageio.core's own test passes,
and that runs blockwise like the checkpoint. Run: packages unetflow did not write (a
hand-written 2-D net without a batch axis, a MONAI BasicUNet in 3-D), built here with
bioimageio.spec and traced to TorchScript, run blockwise and equal bioimageio.core's
own prediction; the output does not depend on the block shape. Refusal: packages whose
weights are a pickle or need the package's Python code execute nothing.

Tolerances: the exported package against the checkpoint 1e-5 (traced vs eager forward
passes, the same float32 ops); unetflow against bioimageio.core 1e-4 absolute (core
divides by ``hi - lo + eps``, unetflow by ``max(hi - lo, eps)``; eps 1e-6).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

from conftest import write_zarr
from unetflow.cli import main
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
from unetflow.errors import CheckpointError
from unetflow.run import segment

bmz = pytest.importorskip("bioimageio.spec.model.v0_5", reason="bioimage.io packages need bioimageio.spec: pip install 'unetflow[bioimageio]'")
from bioimageio.spec import ValidationContext, save_bioimageio_package  # noqa: E402

DEMO = str(Path(__file__).resolve().parents[1] / "unetflow" / "data" / "demo_unet3d.pt")


def run(tmp_path, inp, model, name, *, block, patch, blend="gaussian", halo=None, trust=False):
    config = RunConfig(
        input=inp, output=str(tmp_path / name), model=model,
        tiling=TilingSpec(block_shape=block, patch_shape=patch, blend=blend, halo=halo, batch_size=2),
        output_settings=OutputSettings(overwrite=True, chunk_shape=block), cluster=ClusterSpec(kind="inline"),
        trust_model_code=trust, device="cpu",  # float32: the tolerances below are not bf16's
    )
    segment(config, progress=False)
    return zarr.open_array(str(tmp_path / name))[:]


# --- export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "demo.bioimageio.zip"
    result = CliRunner().invoke(main, ["model", "export", DEMO, str(out), "--author", "A. Tester"])
    assert result.exit_code == 0, result.output
    return out


def test_export_describes_the_net(demo_package):
    """Sizes, normalisation, activation and weights of the exported description."""
    from bioimageio.spec import load_model_description

    descr = load_model_description(str(demo_package), perform_io_checks=False)
    inp, out = descr.inputs[0], descr.outputs[0]
    assert [str(a.id) for a in inp.axes] == ["batch", "channel", "z", "y", "x"]
    assert (inp.axes[2].size.min, inp.axes[2].size.step) == (4, 4)  # depth 2, same: 4 + k*4
    assert out.axes[2].size.offset == 0 and [str(n) for n in out.axes[1].channel_names] == ["background", "interior", "border"]
    (pre,) = [p for p in inp.preprocessing if p.id != "ensure_dtype"]
    assert pre.id == "scale_range" and (pre.kwargs.min_percentile, pre.kwargs.max_percentile) == (1.0, 99.8)
    assert [p.id for p in out.postprocessing if p.id != "ensure_dtype"] == ["softmax"]
    assert descr.weights.torchscript is not None and descr.weights.pytorch_state_dict.architecture.import_from == "unetflow.model.zoo"
    names = zipfile.ZipFile(demo_package).namelist()
    assert {"cover.png", "README.md", "test_input.npy", "test_output.npy"} <= set(names)
    readme = zipfile.ZipFile(demo_package).read("README.md").decode()
    assert "## Training" in readme and "## Validation" in readme and "elastic_strength" in readme


def test_export_passes_bioimageio_test(demo_package):
    """bioimageio.core's own test (what `bioimageio test` runs): both weight formats
    reproduce unetflow's test output and run at several sizes and batch sizes."""
    core = pytest.importorskip("bioimageio.core")
    summary = core.test_model(str(demo_package))
    assert summary.status == "passed", summary.format()


def test_exported_package_runs_blockwise_like_the_checkpoint(tmp_path, demo_package):
    """The package (zip, unpacked folder, its rdf.yaml) run blockwise equals the .pt run."""
    from unetflow.sample import make_sample

    raw, _ = make_sample((20, 36, 28), seed=3)
    inp = write_zarr(tmp_path / "raw.zarr", raw, chunks=(8, 16, 16))
    kw = dict(block=(8, 16, 16), patch=(8, 16, 16))
    want = run(tmp_path, inp, DEMO, "pt.zarr", **kw)
    got = run(tmp_path, inp, str(demo_package), "zip.zarr", **kw)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    folder = tmp_path / "unpacked"
    zipfile.ZipFile(demo_package).extractall(folder)
    np.testing.assert_array_equal(run(tmp_path, inp, str(folder), "dir.zarr", **kw), got)
    np.testing.assert_array_equal(run(tmp_path, inp, str(folder / "rdf.yaml"), "yaml.zarr", **kw), got)


def test_valid_2d_net_exports_with_its_offset_and_tiles_exactly(tmp_path):
    """A valid net (output smaller by 2 * margin: the output axes' offset), meanstd and one
    class (sigmoid): bioimageio.core's test passes, and the package tiles exactly like the .pt."""
    runner = CliRunner()
    pt, pkg = str(tmp_path / "v.pt"), str(tmp_path / "v.zip")
    init = ["model", "init", pt, "--dims", "2", "--padding", "valid", "--depth", "2", "--width", "4", "--classes", "1", "--norm", "meanstd"]
    assert runner.invoke(main, init).exit_code == 0
    assert runner.invoke(main, ["model", "export", pt, pkg]).exit_code == 0
    from bioimageio.spec import load_model_description

    descr = load_model_description(pkg, perform_io_checks=False)
    assert [a.size.offset for a in descr.outputs[0].axes[2:]] == [-40, -40]  # margin 20 of the depth-2 valid U-Net
    assert [p.id for p in descr.inputs[0].preprocessing if p.id != "ensure_dtype"] == ["zero_mean_unit_variance"]
    core = pytest.importorskip("bioimageio.core")
    summary = core.test_model(pkg)
    assert summary.status == "passed", summary.format()
    image = np.random.default_rng(4).normal(300.0, 50.0, (50, 70)).astype(np.float32)
    inp = write_zarr(tmp_path / "raw.zarr", image, chunks=(25, 35))
    kw = dict(block=(16, 32), patch=(52, 60))
    np.testing.assert_allclose(run(tmp_path, inp, pkg, "zip.zarr", **kw), run(tmp_path, inp, pt, "pt.zarr", **kw), atol=1e-6, rtol=0)


def test_model_info_describes_both_alike(demo_package):
    runner = CliRunner()
    a = runner.invoke(main, ["model", "info", DEMO])
    b = runner.invoke(main, ["model", "info", str(demo_package)])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    for key in ("dims", "in_channels", "classes", "valid_sizes", "margin", "halo", "receptive_radius", "preprocessing", "postprocessing"):
        line_a = next(line for line in a.output.splitlines() if line.startswith(key + " "))
        line_b = next(line for line in b.output.splitlines() if line.startswith(key + " "))
        if key not in ("halo",):
            assert line_a == line_b, (line_a, line_b)


# --- packages unetflow did not write --------------------------------------------------------------


class TinyNet(nn.Module):
    """A hand-written same-padded 2-D net without a batch axis: (C, Y, X) -> (1, Y, X)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.c = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.a(x[None]))
        y = torch.relu(self.b(torch.max_pool2d(x, 2)))
        return self.c(torch.relu(self.up(y)) + x)[0]


def package(folder, net, example, *, axes_in, axes_out, sizes, pre, post, weights=None, out_channels=1):
    """A package written with bioimageio.spec: *net* traced to TorchScript (or *weights*).
    Its test output is noise of the right shape (these tests compare with core's predict)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "in.npy", example)
    shape = list(example.shape)
    shape[[a[0] for a in axes_out].index("c")] = out_channels
    np.save(folder / "out.npy", np.random.default_rng(0).random(shape, dtype=np.float32))
    if weights is None:
        torch.jit.save(torch.jit.trace(net.eval(), torch.from_numpy(example)), str(folder / "net.pt"))
        weights = bmz.WeightsDescr(torchscript=bmz.TorchscriptWeightsDescr(source=folder / "net.pt", pytorch_version=bmz.Version("2.13")))

    def axes(spec, out):
        made = []
        for a in spec:
            if a == "b":
                made.append(bmz.BatchAxis())
            elif a.startswith("c"):
                made.append(bmz.ChannelAxis(channel_names=[bmz.Identifier(f"c{i}") for i in range(int(a[1:]))]))
            elif out:
                made.append(bmz.SpaceOutputAxis(id=bmz.AxisId(a), size=bmz.SizeReference(tensor_id=bmz.TensorId("raw"), axis_id=bmz.AxisId(a))))
            else:
                made.append(bmz.SpaceInputAxis(id=bmz.AxisId(a), size=bmz.ParameterizedSize(min=sizes[0], step=sizes[1])))
        return made

    with ValidationContext(perform_io_checks=False):
        descr = bmz.ModelDescr(
            name="foreign", description="a net unetflow did not write", authors=[bmz.Author(name="Someone Else")],
            cite=[bmz.CiteEntry(text="none", doi=bmz.Doi("10.1007/978-3-319-24574-4_28"))], license=bmz.LicenseId("MIT"),
            inputs=[bmz.InputTensorDescr(id=bmz.TensorId("raw"), axes=axes(axes_in, False), test_tensor=bmz.FileDescr(source=folder / "in.npy"),
                                         preprocessing=pre)],
            outputs=[bmz.OutputTensorDescr(id=bmz.TensorId("out"), axes=axes(axes_out, True), test_tensor=bmz.FileDescr(source=folder / "out.npy"),
                                           postprocessing=post)],
            weights=weights,
        )
        return save_bioimageio_package(descr, output_path=folder / "model.zip")


def core_predict(pkg, image):
    core = pytest.importorskip("bioimageio.core")
    sample = core.predict(model=str(pkg), inputs=image)
    return next(iter(sample.members.values())).data.to_numpy()


def test_foreign_2d_package_without_batch_axis_equals_bioimageio_core(tmp_path):
    """scale_range + scale_linear before, sigmoid after; axes (channel, y, x). Blockwise
    with one patch per image, it equals core on the whole image; in crop mode with small
    patches the interior equals core (the image border differs: unetflow mirrors, the net
    zero-pads), and any block shape gives bitwise the same output."""
    image = (np.random.default_rng(1).gamma(2.0, 300.0, (60, 84))).astype(np.float32)
    pre = [bmz.ScaleRangeDescr(kwargs=bmz.ScaleRangeKwargs(axes=[bmz.AxisId("y"), bmz.AxisId("x")], min_percentile=1.0, max_percentile=99.0)),
           bmz.ScaleLinearDescr(kwargs=bmz.ScaleLinearKwargs(gain=2.0, offset=-1.0))]
    pkg = package(tmp_path / "tiny", TinyNet(), image[None], axes_in=("c1", "y", "x"), axes_out=("c1", "y", "x"), sizes=(8, 2),
                  pre=pre, post=[bmz.SigmoidDescr()])
    want = core_predict(pkg, image[None])  # (1, 60, 84)
    inp = write_zarr(tmp_path / "raw.zarr", image, chunks=(30, 42))
    whole = run(tmp_path, inp, str(pkg), "whole.zarr", block=(32, 32), patch=(60, 84))
    np.testing.assert_allclose(whole, want, atol=1e-4, rtol=0)
    from unetflow.model.zoo import PackageSource

    radius = PackageSource(str(pkg)).load().geometry.receptive_radius
    assert 3 <= radius <= 12
    halo = -(-radius // 2) * 2  # a multiple of the net's 2: patches keep the whole image's pooling phase
    a = run(tmp_path, inp, str(pkg), "a.zarr", block=(16, 16), patch=(32, 32), blend="crop", halo=(halo, halo))
    b = run(tmp_path, inp, str(pkg), "b.zarr", block=(48, 32), patch=(32, 32), blend="crop", halo=(halo, halo))
    np.testing.assert_array_equal(a, b)
    r = radius + 1
    np.testing.assert_allclose(a[:, r:-r, r:-r], want[:, r:-r, r:-r], atol=1e-4, rtol=0)


def test_foreign_monai_3d_package_equals_bioimageio_core(tmp_path):
    """A MONAI BasicUNet (batch norm, 4 poolings: sizes 16 + k*16), traced, with
    zero_mean_unit_variance and softmax: blockwise equals core; block shape does not matter."""
    monai = pytest.importorskip("monai")
    torch.manual_seed(0)
    net = monai.networks.nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4), norm="batch").eval()
    image = np.random.default_rng(2).normal(500.0, 80.0, (32, 32, 48)).astype(np.float32)
    pre = [bmz.ZeroMeanUnitVarianceDescr(kwargs=bmz.ZeroMeanUnitVarianceKwargs(axes=[bmz.AxisId(a) for a in "zyx"]))]
    post = [bmz.SoftmaxDescr(kwargs=bmz.SoftmaxKwargs(axis=bmz.AxisId("channel")))]
    pkg = package(tmp_path / "monai", net, image[None, None], axes_in=("b", "c1", "z", "y", "x"), axes_out=("b", "c2", "z", "y", "x"),
                  sizes=(16, 16), pre=pre, post=post, out_channels=2)
    want = core_predict(pkg, image[None, None])[0]  # (2, 32, 32, 48)
    inp = write_zarr(tmp_path / "raw.zarr", image, chunks=(16, 16, 16))
    a = run(tmp_path, inp, str(pkg), "a.zarr", block=(16, 16, 16), patch=(32, 32, 48))
    b = run(tmp_path, inp, str(pkg), "b.zarr", block=(32, 16, 48), patch=(32, 32, 48))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, want, atol=1e-4, rtol=0)


# --- refusals --------------------------------------------------------------------------------------


MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('code ran')\n"


class Pwn:
    """Unpickling this runs code: what a pickle-bearing weight file can do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(marker=self.marker),))


def state_dict_package(tmp_path, *, architecture, weights_obj):
    torch.save(weights_obj, tmp_path / "weights.pt")
    weights = bmz.WeightsDescr(pytorch_state_dict=bmz.PytorchStateDictWeightsDescr(
        source=tmp_path / "weights.pt", architecture=architecture, pytorch_version=bmz.Version("2.13")))
    example = np.zeros((1, 1, 16, 16), np.float32)
    return package(tmp_path / "pkg", None, example, axes_in=("b", "c1", "y", "x"), axes_out=("b", "c1", "y", "x"), sizes=(8, 4),
                   pre=[], post=[], weights=weights)


def refused(tmp_path, pkg, *flags):
    inp = write_zarr(tmp_path / "raw.zarr", np.zeros((16, 16), np.float32))
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(main, ["segment", inp, str(out), "--model", str(pkg), "--workers", "0", "--no-progress", *flags])
    return result, out


def test_code_bearing_package_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker.txt"
    (tmp_path / "arch.py").write_text(MARKER_CODE.format(marker=str(marker)) + (
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.ones(()))\n    def forward(self, x):\n        return x * self.w\n"))
    arch = bmz.ArchitectureFromFileDescr(source=tmp_path / "arch.py", callable=bmz.Identifier("Net"))
    marker.unlink(missing_ok=True)
    pkg = state_dict_package(tmp_path, architecture=arch, weights_obj={"w": torch.tensor(2.0)})
    result, out = refused(tmp_path, pkg)
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert "pytorch_state_dict" in line and "arch.py" in line and "--trust-model-code" in line, line
    assert not marker.exists() and not out.exists()
    trusted, out = refused(tmp_path, pkg, "--trust-model-code")
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists()  # trusted: the package's code ran, as asked
    np.testing.assert_array_equal(zarr.open_array(str(out))[:], np.zeros((1, 16, 16), np.float32))


@pytest.mark.parametrize("trust", [False, True])
def test_pickle_bearing_weights_are_refused_and_run_nothing(tmp_path, trust):
    """A unetflow architecture with a weight file holding a pickled object: refused by
    the weights_only load, trusted or not; the object's code never runs."""
    marker = tmp_path / "marker.txt"
    arch = bmz.ArchitectureFromLibraryDescr(callable=bmz.Identifier("build_unet"), import_from="unetflow.model.zoo",
                                            kwargs={"dims": 2, "in_channels": 1, "classes": 1, "depth": 2, "width": 2})
    pkg = state_dict_package(tmp_path, architecture=arch, weights_obj={"w": Pwn(str(marker))})
    assert not marker.exists()
    result, out = refused(tmp_path, pkg, *(["--trust-model-code"] if trust else []))
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert "cannot be loaded safely" in line and "pickled" in line, line
    assert not marker.exists() and not out.exists()


def test_unsupported_weight_formats_are_named(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"not really onnx")
    weights = bmz.WeightsDescr(onnx=bmz.OnnxWeightsDescr(source=tmp_path / "m.onnx", opset_version=15))
    example = np.zeros((1, 1, 16, 16), np.float32)
    pkg = package(tmp_path / "pkg", None, example, axes_in=("b", "c1", "y", "x"), axes_out=("b", "c1", "y", "x"), sizes=(8, 4),
                  pre=[], post=[], weights=weights)
    from unetflow.model.zoo import PackageSource

    with pytest.raises(CheckpointError, match=r"weights in onnx; unetflow runs torchscript"):
        PackageSource(str(pkg)).load()
    shutil.rmtree(tmp_path / "pkg")


# --- the mapping, piece by piece ----------------------------------------------------------------


@pytest.mark.parametrize("order", [
    ("b", "c", "z", "y", "x"),  # unetflow's own layout
    ("c", "z", "y", "x"),  # no batch axis: one sample at a time
    ("b", "z", "y", "x", "c"),  # channels last
    ("b", "1", "c", "x", "y", "z"),  # a size-1 extra axis, space reversed
    ("z", "y", "x"),  # neither batch nor channel
])
def test_axes_round_trip(order):
    from unetflow.model.zoo import from_package, to_package

    channels = 1 if "c" not in order else 2
    batch = 1 if "b" not in order else 3
    x = torch.arange(batch * channels * 4 * 5 * 6, dtype=torch.float32).reshape(batch, channels, 4, 5, 6)
    y = to_package(x, order, ("z", "y", "x"))
    assert y.ndim == len(order)
    np.testing.assert_array_equal(from_package(y, order, ("z", "y", "x")).numpy(), x.numpy())


def test_processing_the_engine_cannot_apply_is_refused(tmp_path):
    from unetflow.model.zoo import map_description

    image = np.zeros((1, 1, 16, 16), np.float32)
    net = nn.Conv2d(1, 1, 1)
    stats = bmz.ZeroMeanUnitVarianceDescr(kwargs=bmz.ZeroMeanUnitVarianceKwargs(axes=[bmz.AxisId("y"), bmz.AxisId("x")]))
    fixed = bmz.ScaleLinearDescr(kwargs=bmz.ScaleLinearKwargs(gain=2.0, offset=0.0))
    pkg = package(tmp_path / "late", net, image, axes_in=("b", "c1", "y", "x"), axes_out=("b", "c1", "y", "x"), sizes=(8, 4),
                  pre=[fixed, stats], post=[])
    from bioimageio.spec import load_model_description

    descr = load_model_description(str(pkg), perform_io_checks=False)
    with pytest.raises(CheckpointError, match=r"zero_mean_unit_variance.*after a fixed step"):
        map_description(descr, name="late")
    mapping = map_description(descr.model_copy(update={"inputs": [descr.inputs[0].model_copy(update={"preprocessing": [stats, fixed]})]}),
                              name="ok")
    assert mapping.norm.kind == "meanstd" and [s.id for s in mapping.pre] == ["scale_linear"]


def test_weights_at_a_url_are_refused_without_a_download():
    from types import SimpleNamespace

    from unetflow.model.zoo import _local_bytes

    remote = SimpleNamespace(source="https://example.org/weights.pt", get_reader=lambda: pytest.fail("tried to download"))
    with pytest.raises(CheckpointError, match=r"on the internet; unetflow reads local files only"):
        _local_bytes(remote, name="remote.yaml")


def test_a_folder_without_a_description_is_named(tmp_path):
    from unetflow.errors import InputNotFoundError
    from unetflow.model.predictor import model_source

    with pytest.raises(InputNotFoundError, match=r"holds no rdf.yaml"):
        model_source(str(tmp_path))
